"""The edge's learning loop, wired: spools, feedback, round announcements and learners.

:class:`EdgeLearning` is built from the edge settings before Triton starts (so each
model's spool and its capture parameters exist when ``model.py`` loads) and started on
the edge's NATS connection: it answers feedback, follows ``fedgate_rounds`` and runs
one :class:`~edge_runtime.learner.Learner` per served model until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS

from edge_runtime.events import EventLog
from edge_runtime.fed_eval import EvalResponder
from edge_runtime.feedback import FeedbackResponder
from edge_runtime.idle import IdleThresholds
from edge_runtime.learner import Learner, LearnerConfig, Publish
from edge_runtime.metrics_poll import MetricsPoller
from edge_runtime.rounds_watch import (
    RoundsView,
    ServedVersion,
    served_versions,
    stage_verified,
    watch_rounds,
)
from edge_runtime.sealer import Keys
from edge_runtime.secagg_round import SecAggParticipant
from edge_runtime.settings import EdgeSettings
from edge_runtime.spool import Spool, spool_path
from fedcore.artifact import MANIFEST, Manifest
from fedcore.compression import CompressionSettings, sizes_from_layout
from fedcore.enrollment import load_registry
from fedcore.models import get_spec
from fedcore.params import layout
from fedcore.spec import ModelSpec, TrainingRecipe
from fedcore.triton_config import CaptureParams

log = logging.getLogger(__name__)

IndexReader = Callable[[], list[dict[str, object]]]


def capture_params(settings: EdgeSettings, model: str) -> CaptureParams:
    """What ``model.py`` of ``model`` captures on this edge (into ``config.pbtxt``)."""
    return CaptureParams(
        spool_path=str(spool_path(settings.data_dir, model).resolve()),
        rate=settings.capture_rate,
        capacity=settings.spool_capacity,
        tombstones=settings.spool_tombstones,
    )


def recipe_for(s: EdgeSettings, spec: ModelSpec) -> TrainingRecipe:
    """The spec's training recipe with every ``TRAIN_*`` setting the deployment set."""
    return spec.recipe.overridden(**s.recipe_overrides())


def learner_config(settings: EdgeSettings, model: str) -> LearnerConfig:
    """One model's learner settings, from the edge settings."""
    s = settings
    spec = get_spec(model)
    return LearnerConfig(
        edge_id=s.edge_id,
        model=model,
        work_dir=s.data_dir / "learner" / model,
        sizes=tuple(sizes_from_layout(layout(spec.build_module()))),
        poll_interval_s=s.idle_poll_interval_s,
        thresholds=IdleThresholds(
            max_pending=s.idle_max_pending,
            max_request_rate=s.idle_max_request_rate,
            max_queue_us=s.idle_max_queue_us,
            quiet_s=s.idle_quiet_s,
            window_s=s.idle_window_s,
        ),
        min_new_labels=s.min_new_labels,
        recipe=recipe_for(s, spec),
        holdout_fraction=s.holdout_fraction,
        device=s.train_device,
        threads=s.train_threads,
        nice=s.train_nice,
        sched_idle=s.train_sched_idle,
        clip_norm=s.clip_norm,
        secure=model in s.secagg,
        compression=CompressionSettings(
            mode=s.update_compression, topk_fraction=s.update_topk_fraction
        ),
        window_budget_s=s.train_window_budget_s,
        daily_budget_s=s.train_daily_budget_s,
        spool_max_age_s=s.spool_max_age_s,
    )


class EdgeLearning:
    """Everything the edge does to learn from its traffic."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        repository: Path,
        metrics_url: str,
        read_index: IndexReader,
        trusted: ed25519.Ed25519PublicKey,
        keys: Keys,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.read_index = read_index
        self.trusted = trusted
        self.keys = keys
        self.events = EventLog()
        self.rounds = RoundsView()
        self.poller = MetricsPoller(metrics_url)
        self.spools = {m: Spool(spool_path(settings.data_dir, m)) for m in settings.models}
        self.feedback = FeedbackResponder(settings.edge_id, self.spools)
        self.evaluation = EvalResponder(
            settings.edge_id, self.spools, keys.signer, trusted, settings.holdout_fraction
        )
        self.learners: dict[str, Learner] = {}
        self.secagg: SecAggParticipant | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._staged: dict[tuple[str, int], tuple[int, Manifest, Path]] = {}

    async def start(self, nc: NATS, publish: Publish) -> None:
        """Answer feedback, follow rounds and (if enabled) run the learners, taking part
        in secure rounds of the models that have secure aggregation on; score the trainer's
        candidates on the local held-out split (federated evaluation)."""
        await self.feedback.start(nc)
        await self.evaluation.start(nc)
        if not self.settings.learning_enabled:
            return
        self.secagg = await self._start_secagg(nc)
        self._tasks.append(
            asyncio.create_task(watch_rounds(nc.jetstream(), self.rounds, self._stop))
        )
        for model, spool in self.spools.items():
            learner = Learner(
                learner_config(self.settings, model),
                spool=spool,
                rounds=self.rounds,
                read_load=functools.partial(self.poller.read, model),
                read_served=functools.partial(self._read_served, model),
                publish=publish,
                keys=self.keys,
                events=self.events,
                secagg=self.secagg if model in self.settings.secagg else None,
            )
            self.learners[model] = learner
            self._tasks.append(asyncio.create_task(learner.run(self._stop)))

    async def _start_secagg(self, nc: NATS) -> SecAggParticipant | None:
        s = self.settings
        if not s.secagg or s.secagg_registry_file is None:
            return None
        registry = s.secagg_registry_file

        def enrolled() -> Mapping[str, ed25519.Ed25519PublicKey]:
            return load_registry(registry).active_keys()

        async def send(subject: str, data: bytes) -> None:
            await nc.publish(subject, data)

        participant = SecAggParticipant(
            s.edge_id,
            self.keys.signer,
            enrolled,
            {m: options.config() for m, options in s.secagg.items()},
            self.rounds,
            send,
            events=self.events,
        )
        await participant.start(nc)
        return participant

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop learners (their workers too), the watcher and feedback. Idempotent."""
        self._stop.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            self._tasks.clear()
        for learner in self.learners.values():
            with contextlib.suppress(Exception):
                await learner.close()
        with contextlib.suppress(Exception):
            await self.feedback.stop()
        with contextlib.suppress(Exception):
            await self.evaluation.stop()

    def close(self) -> None:
        for spool in self.spools.values():
            spool.close()

    async def _read_served(self, model: str) -> Mapping[int, ServedVersion]:
        return await asyncio.to_thread(self._served, model)

    def _served(self, model: str) -> Mapping[int, ServedVersion]:
        ready = {
            int(str(e.get("version")))
            for e in self.read_index()
            if e.get("name") == model
            and e.get("state") == "READY"
            and str(e.get("version")).isdigit()
        }
        staging = self.settings.data_dir / "learner" / model / "versions"

        def stage(directory: Path, version: int) -> tuple[Manifest, Path]:
            stamp = (directory / MANIFEST).stat().st_mtime_ns
            cached = self._staged.get((model, version))
            if cached is not None and cached[0] == stamp:
                return cached[1], cached[2]
            dest = staging / str(version)
            manifest = stage_verified(directory, dest, self.trusted, model=model, version=version)
            self._staged[(model, version)] = (stamp, manifest, dest)
            return manifest, dest

        return served_versions(self.repository / model, ready, stage)
