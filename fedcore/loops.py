"""Service loops that outlive their dependencies: backoff, and a count of their failures.

A long-running loop (a heartbeat, a watch, a round loop, a probe) that meets a failing
dependency (NATS down, Triton down, the gateway unreachable) logs it, counts it with
:func:`loop_failed` and tries again after :class:`Backoff`'s next delay; it never ends
on the exception. Each service exports the counts of its own loops as
``fedgate_<service>_loop_failures_total{loop}`` (:class:`LoopFailureCollector`).

The counts are per process (each service is its own process); they are keyed by
service as well, so that tests running several services in one process read each
service's own.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric


class Backoff:
    """Exponential delays with a cap and jitter: ``base * factor**n``, at most ``cap``,
    each multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` (still at most
    ``cap``), so that many clients retrying after one outage do not all retry at once."""

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if base_s <= 0 or cap_s < base_s or factor < 1 or not 0 <= jitter < 1:
            raise ValueError(f"bad backoff: base {base_s}, cap {cap_s}, factor {factor}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        exponent = min(self.attempts, 64)  # no overflow, however long it fails
        self.attempts += 1
        raw = min(self.cap_s, self.base_s * self.factor**exponent)
        spread = 1.0 + self.jitter * (2.0 * self._rand() - 1.0)
        return min(self.cap_s, raw * spread)

    def reset(self) -> None:
        """After a success: the next failure starts from ``base_s`` again."""
        self.attempts = 0


class LoopFailures:
    """Thread-safe counts of loop failures by (service, loop)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def record(self, service: str, loop: str) -> None:
        with self._lock:
            key = (service, loop)
            self._counts[key] = self._counts.get(key, 0) + 1

    def count(self, service: str, loop: str) -> int:
        with self._lock:
            return self._counts.get((service, loop), 0)

    def of(self, service: str) -> dict[str, int]:
        with self._lock:
            return {loop: n for (s, loop), n in self._counts.items() if s == service}


FAILURES = LoopFailures()
"""This process's loop failures (every service loop records here)."""


def loop_failed(
    logger: logging.Logger,
    service: str,
    loop: str,
    exc: BaseException,
    retry_in_s: float | None = None,
    *,
    expected: bool = True,
) -> None:
    """Count one failure of ``service``'s ``loop`` and log it (with the traceback when it
    was not ``expected``, i.e. not a known dependency failure)."""
    FAILURES.record(service, loop)
    when = f"; retrying in {retry_in_s:.2f}s" if retry_in_s is not None else "; continuing"
    logger.log(
        logging.WARNING if expected else logging.ERROR,
        "%s loop failed: %r%s",
        loop,
        exc,
        when,
        exc_info=None if expected else exc,
        extra={"loop": loop, "error": repr(exc)},
    )


class LoopFailureCollector:
    """Exports ``fedgate_<service>_loop_failures_total{loop}``; ``loops`` are exported
    from the start, at 0."""

    def __init__(
        self, service: str, loops: Iterable[str], failures: LoopFailures = FAILURES
    ) -> None:
        self.service = service
        self.loops = list(loops)
        self.failures = failures

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"fedgate_{self.service}_loop_failures",
            f"Failures of the {self.service}'s service loops (logged and retried), by loop",
            labels=["loop"],
        )
        counts = dict.fromkeys(self.loops, 0) | self.failures.of(self.service)
        for loop, n in sorted(counts.items()):
            family.add_metric([loop], n)
        yield family
