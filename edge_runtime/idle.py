"""Is this edge idle? Decided from Triton's own metrics and the edge's recent traffic.

Sans-IO: feed :meth:`IdleDetector.observe` one :class:`~edge_runtime.metrics_poll.TritonLoad`
per poll (every ~0.25 s) and it answers with an :class:`IdleReading`. The edge is busy
at once when any request is pending beyond ``max_pending``, when the request rate over
the last ``window_s`` exceeds ``max_request_rate``, when a whole window's worth of
requests arrived within one poll interval (a burst), or when requests queued longer than
``max_queue_us`` on average. It becomes idle only after ``quiet_s`` without any of that:
a window opens slowly and closes fast.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from edge_runtime.metrics_poll import TritonLoad
from edge_runtime.settings import edge_default


@dataclass(frozen=True)
class IdleThresholds:
    """When the edge counts as idle (the edge settings ``idle_*`` fill these; the defaults
    here are those settings' defaults)."""

    max_pending: int = edge_default("idle_max_pending")
    max_request_rate: float = edge_default("idle_max_request_rate")
    max_queue_us: float = edge_default("idle_max_queue_us")
    quiet_s: float = edge_default("idle_quiet_s")
    window_s: float = edge_default("idle_window_s")


@dataclass(frozen=True)
class IdleReading:
    """The detector's answer; ``reason`` says why (``idle``, ``settling``, ``pending``,
    ``rate``, ``burst``, ``queue``, ``no-data``)."""

    idle: bool
    reason: str
    rate: float = 0.0
    queue_us: float = 0.0
    pending: int = 0


class IdleDetector:
    """Tracks readings of one model's load and says whether a training window is open."""

    def __init__(self, thresholds: IdleThresholds) -> None:
        self.t = thresholds
        self._history: deque[TritonLoad] = deque()
        self._quiet_since: float | None = None

    def reset(self) -> None:
        """Forget the history (Triton restarted, counters went back)."""
        self._history.clear()
        self._quiet_since = None

    def observe(self, load: TritonLoad) -> IdleReading:
        """Record one reading and judge the edge's state."""
        if self._history and load.requests < self._history[-1].requests:
            self.reset()  # counters restarted
        previous = self._history[-1] if self._history else None
        self._history.append(load)
        while len(self._history) > 2 and load.ts - self._history[1].ts >= self.t.window_s:
            self._history.popleft()
        if previous is None:
            return IdleReading(False, "no-data", pending=load.pending)
        oldest = self._history[0]
        reading = IdleReading(
            False,
            self._busy_reason(load, previous, oldest),
            rate=load.rate_since(oldest),
            queue_us=load.queue_us_since(oldest),
            pending=load.pending,
        )
        if reading.reason:
            self._quiet_since = None
            return reading
        if self._quiet_since is None:
            self._quiet_since = load.ts
        idle = load.ts - self._quiet_since >= self.t.quiet_s
        return IdleReading(
            idle, "idle" if idle else "settling", reading.rate, reading.queue_us, load.pending
        )

    def _busy_reason(self, load: TritonLoad, previous: TritonLoad, oldest: TritonLoad) -> str:
        t = self.t
        if load.pending > t.max_pending:
            return "pending"
        if load.requests - previous.requests > t.max_request_rate * t.window_s:
            return "burst"
        if load.rate_since(oldest) > t.max_request_rate:
            return "rate"
        if load.queue_us_since(oldest) > t.max_queue_us:
            return "queue"
        return ""
