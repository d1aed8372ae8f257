"""The edge's supervision of its tritonserver: notice a crash or a hang, say not-ready at
once, restart with backoff, and serve the verified versions again.

:class:`TritonSupervisor` watches the server process (its exit is seen within
``EXIT_POLL_S``) and probes ``/v2/health/live`` every ``probe_interval_s`` with a
timeout; ``probe_failures`` failed probes in a row mean it is hung (SIGSTOP, a deadlock).
Either way it

1. marks Triton down, so the next heartbeat (sent at once) has no version ready and the
   gateway stops routing to this edge;
2. kills what is left of it (the server if hung, and its python-backend stubs, which
   outlive a killed server, and their shared memory);
3. after a delay (:class:`fedcore.loops.Backoff`: doubling from ``restart_base_s`` up to
   ``restart_max_s``, with jitter; reset once Triton stayed up ``STABLE_S``) verifies the
   repository again (:func:`reverify_repository`: only versions whose signed manifest
   still verifies stay), starts Triton on the same ports and repository and loads every
   model: the versions it served before, as far as they verify;
4. marks it up (the next heartbeat lists the ready versions again) and counts the
   restart by reason (``exited``, ``hung``).

A failed restart is logged and tried again after the next delay, for as long as the
runtime runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge_runtime.errors import ModelLoadError
from edge_runtime.settings import edge_default
from edge_runtime.triton import TritonFailure, TritonServer
from fedcore.artifact import verify_version_dir
from fedcore.errors import ArtifactError, ProcessError
from fedcore.loops import Backoff

log = logging.getLogger(__name__)

EXIT_POLL_S = 0.1
STABLE_S = 60.0
REASONS = ("exited", "hung")


@dataclass(frozen=True)
class SupervisionPolicy:
    """How often to probe, when to call Triton hung, how to back off restarts."""

    probe_interval_s: float = edge_default("triton_probe_interval_s")
    probe_timeout_s: float = edge_default("triton_probe_timeout_s")
    probe_failures: int = edge_default("triton_probe_failures")
    restart_base_s: float = edge_default("triton_restart_base_s")
    restart_max_s: float = edge_default("triton_restart_max_s")
    ready_timeout_s: float = edge_default("ready_timeout_s")


@dataclass
class SupervisionStats:
    """What the supervisor reports: Triton up or not, restarts by reason, failed tries."""

    up: bool = True
    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    failed_restarts: int = 0


def reverify_repository(
    repository: Path, models: Sequence[str], trusted: ed25519.Ed25519PublicKey
) -> dict[str, list[int]]:
    """Verify every version directory of ``models`` in place (Triton is down: the
    python-backend stub's ``__pycache__`` is removed first); a version that no longer
    verifies is removed from the repository. Returns the versions kept per model."""
    kept: dict[str, list[int]] = {}
    for model in models:
        model_dir = repository / model
        kept[model] = []
        if not model_dir.is_dir():
            continue
        for directory in sorted(p for p in model_dir.iterdir() if p.name.isdigit()):
            version = int(directory.name)
            shutil.rmtree(directory / "__pycache__", ignore_errors=True)
            try:
                verify_version_dir(directory, trusted, model=model, version=version)
            except ArtifactError as exc:
                log.error(
                    "version %d of %s no longer verifies; not served: %s",
                    version,
                    model,
                    exc,
                    extra={"model": model, "version": version, "reason": exc.reason},
                )
                shutil.rmtree(directory, ignore_errors=True)
                continue
            kept[model].append(version)
    return kept


class TritonSupervisor:
    """Keeps one :class:`TritonServer` serving; see the module docstring."""

    def __init__(
        self,
        triton: TritonServer,
        models: Sequence[str],
        policy: SupervisionPolicy,
        *,
        restore: Callable[[], None],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.triton = triton
        self.models = list(models)
        self.policy = policy
        self.restore = restore
        self.on_change = on_change
        self.stats = SupervisionStats()  # up: start_triton() brought it up before run()
        self._backoff = Backoff(policy.restart_base_s, policy.restart_max_s)

    @property
    def up(self) -> bool:
        return self.stats.up

    async def run(self, stop: asyncio.Event) -> None:
        """Watch, and recover from each fault, until ``stop``."""
        while not stop.is_set():
            reason = await self._watch(stop)
            if reason is None:
                return
            self._down(reason)
            await self._recover(stop)

    async def _watch(self, stop: asyncio.Event) -> str | None:
        """Wait until Triton exits or stops answering (its reason), or ``stop`` (None)."""
        p = self.policy
        failures = 0
        up_since = next_probe = time.monotonic()
        while not stop.is_set():
            code = self.triton.process.exited()
            if code is not None:
                log.error(
                    "tritonserver exited with code %d; restarting it",
                    code,
                    extra={"exit_code": code, "log_tail": self.triton.process.log_tail(5)},
                )
                return "exited"
            now = time.monotonic()
            if now - up_since >= STABLE_S:
                self._backoff.reset()
            if now >= next_probe:
                next_probe = now + p.probe_interval_s
                failures = 0 if await self._probe() else failures + 1
                if failures >= p.probe_failures:
                    log.error(
                        "tritonserver did not answer %d liveness probes (%.1fs timeout); "
                        "restarting it",
                        failures,
                        p.probe_timeout_s,
                    )
                    return "hung"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), EXIT_POLL_S)
        return None

    async def _probe(self) -> bool:
        try:
            return await asyncio.to_thread(self.triton.live, self.policy.probe_timeout_s)
        except TritonFailure:
            return False

    def _down(self, reason: str) -> None:
        self.stats.up = False
        self.stats.restarts[reason] += 1
        self.on_change()  # the heartbeat goes out now, with nothing ready

    async def _recover(self, stop: asyncio.Event) -> None:
        """Kill what is left, then restart with backoff until it serves (or ``stop``)."""
        await asyncio.to_thread(self.triton.kill)
        while not stop.is_set():
            delay = self._backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            try:
                await self._restart()
            except (ProcessError, ModelLoadError, *TritonFailure) as exc:
                self.stats.failed_restarts += 1
                log.error("tritonserver restart failed: %s; trying again", exc)
                await asyncio.to_thread(self.triton.kill)
                continue
            self.stats.up = True
            self.on_change()
            log.info(
                "tritonserver restarted and serving again",
                extra={"restarts": sum(self.stats.restarts.values())},
            )
            return

    async def _restart(self) -> None:
        await asyncio.to_thread(self.restore)
        await asyncio.to_thread(self.triton.clear_previous)
        self.triton.process.start()  # here, on the loop's (main) thread: the death signal
        await asyncio.to_thread(
            self.triton.process.wait_ready,
            lambda: self.triton.live(self.policy.probe_timeout_s),
            self.policy.ready_timeout_s,
        )
        failures: list[ModelLoadError] = []
        for model in self.models:
            try:
                await asyncio.to_thread(self._load, model)
            except ModelLoadError as exc:  # one model's failure leaves the others serving
                log.error("after the restart: %s", exc, extra={"model": model})
                failures.append(exc)
        if failures and len(failures) == len(self.models):
            raise failures[0]

    def _load(self, model: str) -> None:
        """Load ``model``; a version Triton refuses is logged as long as another serves."""
        try:
            self.triton.load(model)
        except ModelLoadError as exc:
            entries = self.triton.index(self.policy.probe_timeout_s)
            if not any(e.get("name") == model and e.get("state") == "READY" for e in entries):
                raise
            log.warning("after the restart: %s", exc, extra={"model": model})


class SupervisorCollector:
    """``fedgate_edge_triton_restarts_total{reason}`` and ``fedgate_edge_triton_up``."""

    def __init__(self, stats: SupervisionStats) -> None:
        self.stats = stats

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "fedgate_edge_triton_restarts",
            "Restarts of the edge's tritonserver after it exited or hung, by reason",
            labels=["reason"],
        )
        for reason, count in self.stats.restarts.items():
            restarts.add_metric([reason], count)
        yield restarts
        yield GaugeMetricFamily(
            "fedgate_edge_triton_up",
            "1 while the edge's tritonserver serves, 0 while it is being restarted",
            value=1 if self.stats.up else 0,
        )
