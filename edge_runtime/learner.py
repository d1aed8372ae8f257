"""The edge's learning loop for one model: idle windows in, sealed updates out.

Every ``poll_interval_s`` the learner reads Triton's metrics and asks the idle detector.
With no job running, an idle edge with training budget left, at least
``min_new_labels`` labels joined since its last update, and a round it may take part in
(:func:`edge_runtime.rounds_watch.decide`) starts a fine-tuning worker from the served
base version. While the job runs, traffic returning (or the budget running out) pauses
it before its next mini-batch; the next idle window resumes it; a round that moves on
abandons it. A finished job becomes an update: delta = local - base (flat FP32),
optionally clipped to ``clip_norm``, compressed, sealed for the round with the local
metrics in the signed header, and published. Only the sealed update leaves the edge. In a
securely aggregated round the delta goes to the secure-aggregation participant instead
(:class:`SecAggSink`), which sends it only masked (``docs/secagg.md``).
Everything is recorded in the :class:`~edge_runtime.events.EventLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from edge_runtime.budget import TrainingBudget
from edge_runtime.errors import EdgeError
from edge_runtime.events import EventLog
from edge_runtime.finetune import Device, JobSpec, recipe_metrics, told
from edge_runtime.idle import IdleDetector, IdleReading, IdleThresholds
from edge_runtime.metrics_poll import TritonLoad
from edge_runtime.rounds_watch import (
    Plan,
    Refusal,
    RoundsView,
    ServedVersion,
    decide,
    still_takes,
)
from edge_runtime.sealer import Keys, UpdateFor, UpdateSealer
from edge_runtime.settings import edge_default
from edge_runtime.spool import Spool
from edge_runtime.worker import FinetuneWorker
from edge_runtime.worker_reports import (
    Failed,
    Finished,
    Paused,
    Resumed,
    Started,
    Stopped,
    WorkerReport,
)
from fedcore.compression import CompressionSettings
from fedcore.errors import FedgateError
from fedcore.models import ref_of
from fedcore.params import load_weights_file
from fedcore.spec import TrainingRecipe

log = logging.getLogger(__name__)

ReadLoad = Callable[[], Awaitable[TritonLoad]]
ReadServed = Callable[[], Awaitable[Mapping[int, ServedVersion]]]
Publish = Callable[[bytes | bytearray], Awaitable[Any]]


class SecAggSink(Protocol):
    """Where an update of a securely aggregated round goes instead of an envelope
    (:class:`edge_runtime.secagg_round.SecAggParticipant`)."""

    async def submit(self, model: str, round_no: int, delta: NDArray[Any]) -> None: ...


RESIDUAL_FILE = "error-feedback.npy"
"""The compression residual in the learner's work directory (survives restarts)."""
_SENT_ROUNDS = "sent_rounds"
_BUDGET = "train_budget"
_KEEP_SENT = 64


@dataclass(frozen=True)
class LearnerConfig:
    """One model's learning settings (from the edge settings: :func:`learner_config` in
    :mod:`edge_runtime.learning`; the defaults here are those settings' defaults)."""

    edge_id: str
    model: str
    work_dir: Path
    sizes: tuple[int, ...]
    poll_interval_s: float = edge_default("idle_poll_interval_s")
    thresholds: IdleThresholds = field(default_factory=IdleThresholds)
    min_new_labels: int = edge_default("min_new_labels")
    holdout_fraction: float = edge_default("holdout_fraction")
    device: Device = edge_default("train_device")
    threads: int = edge_default("train_threads")
    nice: int = edge_default("train_nice")
    sched_idle: bool = edge_default("train_sched_idle")
    clip_norm: float | None = edge_default("clip_norm")
    secure: bool = False
    compression: CompressionSettings = field(
        default_factory=lambda: CompressionSettings(
            mode=edge_default("update_compression"),
            topk_fraction=edge_default("update_topk_fraction"),
        )
    )
    window_budget_s: float = edge_default("train_window_budget_s")
    daily_budget_s: float = edge_default("train_daily_budget_s")
    spool_max_age_s: float = edge_default("spool_max_age_s")
    recipe: TrainingRecipe = field(kw_only=True)
    """the spec's recipe with the edge's ``TRAIN_*`` settings over it"""


@dataclass
class Job:
    """A fine-tuning run in progress."""

    plan: Plan
    worker: FinetuneWorker
    base: NDArray[Any]
    job_dir: Path
    recipe: TrainingRecipe
    """what the job trains with: the announcement's recipe over the edge's"""
    result: Finished | None = None
    """the worker's report once it has finished"""
    started: bool = False


class Learner:
    """Drives fine-tuning of one model; :meth:`run` until stopped, or :meth:`tick` by hand."""

    def __init__(
        self,
        config: LearnerConfig,
        *,
        spool: Spool,
        rounds: RoundsView,
        read_load: ReadLoad,
        read_served: ReadServed,
        publish: Publish,
        keys: Keys,
        events: EventLog | None = None,
        secagg: SecAggSink | None = None,
    ) -> None:
        self.config = config
        self.secagg = secagg
        self.spool = spool
        self.rounds = rounds
        self.read_load = read_load
        self.read_served = read_served
        self.publish = publish
        self.keys = keys
        self.events = events or EventLog()
        self.detector = IdleDetector(config.thresholds)
        self.budget = TrainingBudget(config.window_budget_s, config.daily_budget_s)
        self.budget.restore(spool.get_meta(_BUDGET))
        self.sealer = UpdateSealer(
            edge_id=config.edge_id,
            sizes=config.sizes,
            compression=config.compression,
            keys=keys,
            residual_file=config.work_dir / RESIDUAL_FILE,
        )
        self.job: Job | None = None
        self.reading = IdleReading(False, "no-data")
        self._refused: set[tuple[int, str]] = set()
        self._last_tick = time.monotonic()
        self._last_expire = 0.0
        self._jobs = 0
        for stale in config.work_dir.glob("round-*"):  # jobs of a previous run: gone
            shutil.rmtree(stale, ignore_errors=True)

    # -- the loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``poll_interval_s`` until ``stop``; a running job is stopped then."""
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception:  # the learner must never take serving down with it
                    log.exception("learner tick failed", extra={"model": self.config.model})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.poll_interval_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop a running job (abandoned) and persist the budget. Idempotent."""
        if self.job is not None:
            await self._abandon("shutdown")
        self.spool.set_meta(_BUDGET, self.budget.state())

    async def tick(self) -> None:
        """One poll: observe the load, then drive the job or maybe start one."""
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        was_idle = self.reading.idle
        self.reading = await self._observe()
        if self.reading.idle and not was_idle:
            self.budget.open_window()
        if self.job is not None:
            if not self.job.worker.paused:
                self.budget.charge(elapsed)
            await self._drive(self.job)
        else:
            await self._maybe_start()
        await self._expire_old(now)

    async def _observe(self) -> IdleReading:
        try:
            load = await self.read_load()
        except (OSError, ValueError) as exc:
            log.warning("Triton metrics unreadable: %r", exc, extra={"model": self.config.model})
            self.detector.reset()
            return IdleReading(False, "no-data")
        return self.detector.observe(load)

    async def _expire_old(self, now: float) -> None:
        if now - self._last_expire >= 60.0:
            self._last_expire = now
            await asyncio.to_thread(self.spool.expire, self.config.spool_max_age_s)

    # -- starting ------------------------------------------------------------------------
    async def _maybe_start(self) -> None:
        c = self.config
        if not self.reading.idle or not self.budget.allows():
            return
        stats = await asyncio.to_thread(self.spool.stats)
        if stats.new_labels < c.min_new_labels:
            return
        announcement, sent = self.rounds.get(c.model), self.sent_rounds()
        early = decide(announcement, c.edge_id, {}, sent, time.time(), c.secure)
        if isinstance(early, Refusal) and not early.loud:
            return  # no round for this edge now, whatever it serves
        served = await self.read_served()
        decision = decide(announcement, c.edge_id, served, sent, time.time(), c.secure)
        if isinstance(decision, Refusal):
            self._report_refusal(decision)
            return
        await self._start(decision)

    def _report_refusal(self, refusal: Refusal) -> None:
        announcement = self.rounds.get(self.config.model)
        key = (announcement.round if announcement else 0, refusal.reason)
        if refusal.loud and key not in self._refused:
            self._refused.add(key)
            log.warning("round refused: %s", refusal.detail, extra={"model": self.config.model})
            self.events.emit(
                "round-refused", self.config.model, round=key[0], reason=refusal.reason
            )

    async def _start(self, plan: Plan) -> None:
        c = self.config
        self._jobs += 1
        job_dir = c.work_dir / f"round-{plan.round}-{self._jobs}"
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True)
        base_file = job_dir / "base.npy"
        shutil.copyfile(plan.base.weights, base_file)
        base = load_weights_file(base_file, expected=sum(c.sizes))
        recipe = told(c.recipe, plan.announcement.recipe)
        spec = JobSpec(
            model=c.model,
            model_ref=ref_of(c.model),
            spool=self.spool.path,
            base_weights=base_file,
            output=job_dir / "local.npy",
            control=job_dir / "control.bin",
            recipe=recipe,
            holdout_fraction=c.holdout_fraction,
            device=c.device,
            threads=c.threads,
            nice=c.nice,
            sched_idle=c.sched_idle,
            seed=plan.round,
        )
        worker = await FinetuneWorker.start(spec, job_dir)
        self.job = Job(plan, worker, base, job_dir, recipe)

    # -- driving -------------------------------------------------------------------------
    async def _drive(self, job: Job) -> None:
        for report in job.worker.drain():
            ended = self._on_report(job, report)
            if ended is not None:
                await self._abandon(ended)
                return
        if job.result is not None:
            await self._finish(job)
            return
        if (why := self._still_valid(job)) is not None:
            await self._abandon(why)
            return
        exhausted = self.budget.exhausted()
        if not self.reading.idle or exhausted:
            if not job.worker.paused:
                batch = job.worker.pause()
                reason = self.reading.reason if not self.reading.idle else f"budget-{exhausted}"
                self.events.emit("traffic-returned", self.config.model, batch=batch, reason=reason)
        elif job.worker.paused:
            job.worker.resume()

    def _on_report(self, job: Job, report: WorkerReport) -> str | None:
        """Turn a worker report into an event; the reason when the job has ended early."""
        model, round_no = self.config.model, job.plan.round
        if isinstance(report, Started):
            job.started = True
            self.events.emit(
                "train-started",
                model,
                batch=0,
                round=round_no,
                base_version=job.plan.base.version,
                num_samples=report.samples,
                device=report.device,
            )
        elif isinstance(report, Paused | Resumed):
            kind = f"train-{report.event}"
            self.events.emit(kind, model, batch=report.batch, round=round_no)
        elif isinstance(report, Finished):
            job.result = report
            figures = report.figures()
            self.events.emit(
                "train-finished",
                model,
                batch=report.batch,
                round=round_no,
                loss=report.loss,
                accuracy=figures.get("accuracy"),
                **_metric(report, figures),
            )
        elif isinstance(report, Stopped | Failed):
            return report.reason or f"worker {report.event}"
        elif job.result is None:  # exited without finishing
            return f"worker exited ({report.code})"
        return None

    def _still_valid(self, job: Job) -> str | None:
        """Why the job's round no longer takes this update (None: it still does)."""
        return still_takes(job.plan, self.rounds.get(self.config.model), time.time())

    async def _abandon(self, reason: str) -> None:
        job, self.job = self.job, None
        if job is None:
            return
        batch = job.worker.batches_done
        await job.worker.close()
        self.events.emit(
            "train-abandoned",
            self.config.model,
            batch=batch,
            round=job.plan.round,
            reason=reason,
        )
        shutil.rmtree(job.job_dir, ignore_errors=True)

    # -- publishing ----------------------------------------------------------------------
    async def _finish(self, job: Job) -> None:
        self.job = None
        await job.worker.close()
        try:
            await self._publish(job)
        except (FedgateError, OSError, ValueError) as exc:
            log.warning("update not published: %s", exc, extra={"model": self.config.model})
            self.events.emit(
                "train-abandoned",
                self.config.model,
                round=job.plan.round,
                reason=f"publish-failed: {exc}",
            )
        finally:
            shutil.rmtree(job.job_dir, ignore_errors=True)
            self.spool.set_meta(_BUDGET, self.budget.state())

    async def _publish(self, job: Job) -> None:
        c, plan, result = self.config, job.plan, _finished(job)
        local = load_weights_file(job.job_dir / "local.npy", expected=job.base.size)
        delta, norm = clip_delta(local - job.base, c.clip_norm)
        metrics = local_metrics(result, norm) | recipe_metrics(job.recipe)
        if plan.announcement.secure:
            await self._submit_secagg(job, delta)
            self._sent(job, "update-masked", metrics)
            return
        round_no = self._landing_round(plan)
        target = UpdateFor(c.model, round_no, plan.base.version, plan.base.digest)
        sealed = await asyncio.to_thread(
            self.sealer.seal,
            delta,
            target,
            num_samples=result.samples,
            metrics=metrics,
        )
        await self.publish(sealed.envelope)
        self.sealer.commit(sealed)  # published: what it did not carry is the new residual
        self._sent(job, "update-published", metrics, update_id=sealed.header.update_id)
        if round_no != plan.round:
            self._remember_sent(round_no)  # the buffer it joined has this edge's update

    def _landing_round(self, plan: Plan) -> int:
        """The round an update goes to: its own, or in async mode the buffer open now
        (a stale update joins it, weighted down by the trainer)."""
        current = self.rounds.get(self.config.model)
        if plan.announcement.mode == "async" and current is not None and current.mode == "async":
            return max(plan.round, current.round)
        return plan.round

    async def _submit_secagg(self, job: Job, delta: NDArray[Any]) -> None:
        """A secure round's update goes to the secure-aggregation participant, which sends
        it masked; no envelope, no metrics leave the edge with it."""
        c, plan = self.config, job.plan
        if self.secagg is None or not c.secure:
            raise EdgeError(f"round {plan.round} is securely aggregated; it is off here")
        await self.secagg.submit(c.model, plan.round, delta)

    def _sent(self, job: Job, kind: str, metrics: Mapping[str, float], **extra: Any) -> None:
        """The update left (or was handed over): its samples are trained, its round sent."""
        plan, result = job.plan, _finished(job)
        self.spool.mark_trained(result.upto)
        self._remember_sent(plan.round)
        self.events.emit(
            kind,
            self.config.model,
            batch=result.batch,
            round=plan.round,
            base_version=plan.base.version,
            **extra,
            num_samples=result.samples,
            loss=metrics.get("loss"),
            accuracy=metrics.get("accuracy"),
            **_metric(result, metrics),
        )

    def sent_rounds(self) -> set[int]:
        """Rounds this edge has sent an update for (persisted in the spool)."""
        raw = self.spool.get_meta(_SENT_ROUNDS)
        try:
            return {int(r) for r in json.loads(raw)} if raw else set()
        except (ValueError, TypeError):
            return set()

    def _remember_sent(self, round_no: int) -> None:
        rounds = sorted(self.sent_rounds() | {round_no})[-_KEEP_SENT:]
        self.spool.set_meta(_SENT_ROUNDS, json.dumps(rounds))


def clip_delta(delta: NDArray[Any], clip_norm: float | None) -> tuple[NDArray[Any], float]:
    """``delta`` scaled down to L2 norm ``clip_norm`` when longer; and its original norm."""
    vector = np.asarray(delta, dtype=np.float32)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if clip_norm is not None and norm > clip_norm > 0:
        vector = (vector * np.float32(clip_norm / norm)).astype(np.float32)
    return vector, norm


def local_metrics(result: Finished, delta_norm: float) -> dict[str, float]:
    """The aggregate figures that travel (signed) with an update: no sample leaves. The
    model's own metric goes by its name (``accuracy``, ``base_accuracy``, ...)."""
    metrics = {"delta_norm": delta_norm, "holdout": float(result.holdout)}
    for name, value in result.figures().items():
        if value is not None:
            metrics[name] = value
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def _finished(job: Job) -> Finished:
    if job.result is None:
        raise EdgeError(f"round {job.plan.round}: the worker has not finished")
    return job.result


def _metric(result: Finished, values: Mapping[str, Any]) -> dict[str, Any]:
    """The event fields of the model's own metric: its name (from the worker) and value."""
    return {"metric": result.metric, "value": _opt_float(values.get(result.metric))}


def _opt_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
