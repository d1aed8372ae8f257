"""The edge runtime service: prepare the repository, run and supervise Triton, heartbeat
to the fleet, and learn from its traffic (capture, feedback, idle-window fine-tuning:
``learning``).

While Triton is down or being restarted (:mod:`edge_runtime.supervisor`) the heartbeat
says no version is ready; it goes out at once when that changes. A heartbeat that cannot
be built or published (Triton not answering, NATS down) is logged, counted in
``fedgate_edge_loop_failures_total{loop="heartbeat"}`` and tried again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import nats
import nats.errors
from nats.aio.client import Client as NATS

from edge_runtime.errors import ModelLoadError
from edge_runtime.learning import EdgeLearning, capture_params
from edge_runtime.publisher import UpdatePublisher, load_edge_keys
from edge_runtime.repository import detect_kind, prepare_model
from edge_runtime.rollout import build_applier
from edge_runtime.sealer import Keys
from edge_runtime.settings import EdgeSettings
from edge_runtime.supervisor import (
    SupervisionPolicy,
    SupervisorCollector,
    TritonSupervisor,
    reverify_repository,
)
from edge_runtime.telemetry import start_metrics
from edge_runtime.triton import TritonFailure, TritonServer
from fedcore import subjects
from fedcore.errors import FedgateError
from fedcore.keys import ed25519_public_from_hex, read_secret
from fedcore.loops import Backoff, loop_failed
from fedcore.nats_client import close_service, connect_service
from fedcore.wire import Heartbeat, ModelState

log = logging.getLogger(__name__)


class EdgeRuntime:
    """One edge. ``start`` prepares and loads; ``run`` heartbeats until ``stop``."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.kind = detect_kind() if settings.instance_kind == "auto" else settings.instance_kind
        self.repository = settings.data_dir / "model_repository"
        self.triton = TritonServer(
            name=f"tritonserver[{settings.edge_id}]",
            repository=self.repository,
            work_dir=settings.data_dir / "triton",
            host=settings.triton_host,
            http_port=settings.triton_http_port,
            grpc_port=settings.triton_grpc_port,
            metrics_port=settings.triton_metrics_port,
            control_secret=read_secret(settings.triton_control_secret_file),
            exit_timeout_s=settings.exit_timeout_s,
            triton_home=settings.triton_home,
        )
        # Updates are signed with this edge's identity and sealed to the trainer's HPKE key.
        self.signer, self.trainer_hpke = load_edge_keys(
            settings.identity_key_file, settings.trainer_hpke_public_key_file
        )
        self.publisher: UpdatePublisher | None = None
        self.trusted = ed25519_public_from_hex(settings.trainer_public_key_file.read_text())
        self.learning = EdgeLearning(
            settings,
            repository=self.repository,
            metrics_url=f"http://{settings.triton_host}:{settings.triton_metrics_port}/metrics",
            read_index=self.triton.index,
            trusted=self.trusted,
            keys=Keys(self.signer, self.trainer_hpke),
        )
        self.rollouts = build_applier(settings, self.repository, self.trusted, self.triton)
        self.supervisor = TritonSupervisor(
            self.triton,
            settings.models,
            SupervisionPolicy(
                probe_interval_s=settings.triton_probe_interval_s,
                probe_timeout_s=settings.triton_probe_timeout_s,
                probe_failures=settings.triton_probe_failures,
                restart_base_s=settings.triton_restart_base_s,
                restart_max_s=settings.triton_restart_max_s,
                ready_timeout_s=settings.ready_timeout_s,
            ),
            restore=self._restore_repository,
            on_change=self._triton_changed,
        )
        self.metrics = start_metrics(
            settings,
            self.learning.spools,
            self.learning.events,
            collectors=[SupervisorCollector(self.supervisor.stats)],
        )
        self._nc: NATS | None = None
        self._seq = 0
        self._stopping = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._stopped = False

    def start_triton(self) -> None:
        """Install verified versions, start Triton and load every model (main thread).

        A model whose version cannot be installed or loaded is logged and left out; the
        others serve (its heartbeat shows no ready version, with Triton's reason when
        Triton gave one). Only when no model at all is served does the edge stop.
        """
        s = self.settings
        installed = []
        for model in s.models:
            try:
                self._prepare(model)
                installed.append(model)
            except (FedgateError, OSError) as exc:
                log.error("model %s not installed: %s", model, exc, extra={"model": model})
        self.triton.start(self.settings.ready_timeout_s)
        loaded = []
        for model in installed:
            try:
                self.triton.load(model)
            except ModelLoadError as exc:
                log.error("model %s not loaded: %s", model, exc.reason, extra={"model": model})
                continue
            loaded.append(model)
            log.info("model %s loaded", model, extra={"model": model})
        if not loaded:
            raise ModelLoadError(",".join(s.models), None, "no model could be loaded")

    def _prepare(self, model: str) -> None:
        s = self.settings
        capture = capture_params(s, model)
        prepare_model(
            self.repository, s.seed_artifacts_dir, model, self.kind, self.trusted, capture
        )

    def _restore_repository(self) -> None:
        """Before a restart: keep what still verifies; a model left with no version gets
        its newest seed version again."""
        kept = reverify_repository(self.repository, self.settings.models, self.trusted)
        for model, versions in kept.items():
            if not versions:
                self._prepare(model)

    def _triton_changed(self) -> None:
        """Triton went down or came back: heartbeat now; once back, reconcile rollouts."""
        self._beat_now.set()
        if self.supervisor.up:
            self.rollouts.resync()

    def heartbeat(self) -> Heartbeat:
        """The current heartbeat, from Triton's repository index (nothing ready while
        Triton is down, restarting or not answering)."""
        states: dict[str, ModelState] = {m: ModelState() for m in self.settings.models}
        try:
            entries = (
                self.triton.index(self.settings.triton_probe_timeout_s)
                if self.supervisor.up
                else []
            )
        except TritonFailure as exc:
            log.debug("Triton's index unreadable: %r", exc)
            entries = []
        for entry in entries:
            name, version = str(entry.get("name")), str(entry.get("version"))
            if name not in states or not version.isdigit():
                continue
            if entry.get("state") == "READY":
                states[name].ready.append(int(version))
            elif entry.get("state") == "UNAVAILABLE" and entry.get("reason"):
                states[name].failed[int(version)] = str(entry["reason"])
        self._seq += 1
        device = "cuda" if self.kind == "KIND_GPU" else "cpu"
        return Heartbeat(
            edge_id=self.settings.edge_id,
            url=self.triton.url,
            seq=self._seq,
            ts=time.time(),
            models=self.rollouts.annotate(states),
            device=device,
        )

    async def run(self) -> None:
        """Connect to NATS and heartbeat until :meth:`request_stop`."""
        s = self.settings
        self._nc = await connect_service(s, f"edge:{s.edge_id}")
        self.publisher = UpdatePublisher.for_connection(
            self._nc, ack_timeout_s=s.update_ack_timeout_s, attempts=s.update_publish_attempts
        )
        await self.learning.start(self._nc, self.publisher.publish)
        await self.rollouts.start(self._nc)
        supervision = asyncio.create_task(self.supervisor.run(self._stopping))
        try:
            await self._heartbeats(self._nc)
        finally:
            self._stopping.set()
            await supervision

    async def _heartbeats(self, nc: NATS) -> None:
        """Heartbeat every interval (and at once when Triton goes down or comes back)."""
        s = self.settings
        subject = subjects.heartbeat(s.edge_id)
        backoff = Backoff(s.heartbeat_interval_s, max(5.0, s.heartbeat_interval_s))
        while not self._stopping.is_set():
            self._beat_now.clear()
            wait = s.heartbeat_interval_s
            try:
                beat = await asyncio.to_thread(self.heartbeat)
                await nc.publish(subject, beat.encode())
                backoff.reset()
            except Exception as exc:  # the heartbeat never ends on a failure
                wait = backoff.next()
                expected = isinstance(exc, nats.errors.Error | OSError)
                loop_failed(log, "edge", "heartbeat", exc, wait, expected=expected)
            waiters = [
                asyncio.ensure_future(self._stopping.wait()),
                asyncio.ensure_future(self._beat_now.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def request_stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Leave the fleet, close NATS, then stop Triton. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.learning.stop()
        await self.rollouts.stop()
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._nc.publish(subjects.leave(self.settings.edge_id), b"")
            await close_service(self._nc)
        self.triton.stop()
        self.learning.close()


async def serve(settings: EdgeSettings) -> None:
    """Run one edge until SIGTERM or SIGINT."""
    runtime = EdgeRuntime(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop)
    try:
        runtime.start_triton()
        log.info("edge %s ready at %s", settings.edge_id, runtime.triton.url)
        await runtime.run()
    finally:
        await runtime.shutdown()
