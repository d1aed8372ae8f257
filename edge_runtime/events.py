"""The learner's structured event log: what fine-tuning did, in order, in process.

Each event is also logged. Tests (and the benchmark) read the log to assert behaviour
from what happened (``train-paused`` at batch k after ``traffic-returned`` at batch k-1)
rather than from timings. Bounded: the oldest events go first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

log = logging.getLogger("edge_runtime.learner")

KINDS = frozenset(
    {
        "round-refused",  # a round this edge cannot take part in (reason says why)
        "train-started",
        "traffic-returned",  # the idle window closed while training ran (batch = done so far)
        "train-paused",  # the worker stopped between mini-batches (batch = done so far)
        "train-resumed",
        "train-finished",
        "train-abandoned",  # the round moved on, the deadline passed, or the worker failed
        "update-published",
        "update-masked",  # the update went into a secure round, masked (no envelope)
        "secure-refused",  # the edge refused a secure-aggregation step (reason says why)
        "secure-excluded",  # a neighbour's share did not open: it is left out of the round
    }
)


@dataclass(frozen=True)
class LearnEvent:
    """One thing the learner did. ``batch`` counts mini-batches completed so far."""

    kind: str
    model: str
    ts: float
    seq: int
    batch: int | None = None
    round: int | None = None
    base_version: int | None = None
    reason: str | None = None
    update_id: str | None = None
    num_samples: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    device: str | None = None
    metric: str | None = None
    """the model's own metric (accuracy, mae, ...) and its ``value``"""
    value: float | None = None


class EventLog:
    """Append-only, bounded, awaitable."""

    def __init__(self, maxlen: int = 2000) -> None:
        self._events: deque[LearnEvent] = deque(maxlen=maxlen)
        self._seq = 0
        self._changed: asyncio.Event | None = None
        self.listeners: list[Callable[[LearnEvent], None]] = []

    def emit(
        self,
        kind: str,
        model: str,
        *,
        batch: int | None = None,
        round: int | None = None,
        base_version: int | None = None,
        reason: str | None = None,
        update_id: str | None = None,
        num_samples: int | None = None,
        loss: float | None = None,
        accuracy: float | None = None,
        device: str | None = None,
        metric: str | None = None,
        value: float | None = None,
    ) -> LearnEvent:
        """Record and log one event."""
        if kind not in KINDS:
            raise ValueError(f"unknown learner event {kind!r}")
        self._seq += 1
        event = LearnEvent(
            kind,
            model,
            time.time(),
            self._seq,
            batch,
            round,
            base_version,
            reason,
            update_id,
            num_samples,
            loss,
            accuracy,
            device,
            metric,
            value,
        )
        self._events.append(event)
        log.info(kind, extra={k: v for k, v in asdict(event).items() if v is not None})
        for listener in self.listeners:
            listener(event)
        if self._changed is not None:
            self._changed.set()
        return event

    def events(self, kind: str | None = None) -> list[LearnEvent]:
        """Events so far, oldest first, of one ``kind`` or all."""
        return [e for e in self._events if kind is None or e.kind == kind]

    async def wait_for(self, kind: str, timeout_s: float, after: int = 0) -> LearnEvent:
        """The first event of ``kind`` with ``seq > after``; ``TimeoutError`` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._changed is None:
            self._changed = asyncio.Event()
        while True:
            for event in self._events:
                if event.kind == kind and event.seq > after:
                    return event
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no {kind} event within {timeout_s}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue
