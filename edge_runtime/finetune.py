"""Local fine-tuning, pre-emptible between mini-batches: the worker process and its parts.

The learner runs ``python -m edge_runtime.finetune <job.json>`` as a child process at low
CPU priority (``os.nice``) with one torch thread, so serving keeps the CPU whenever it
wants it. The worker reads the labelled samples from the spool itself (they never cross
a pipe), starts from the served version's flat weights, and trains with the optimiser (the
recipe of the round's announcement, else the edge's settings, else the model's spec) and
the task's loss, optionally with FedProx's proximal term, for at most ``max_steps``
mini-batches. Before every mini-batch it reads a 16-byte
control file mapped in both processes: ``run``, ``pause`` (it waits there, holding no
lock, until ``run`` again) or ``stop``; after each mini-batch it writes how many it has
done. So traffic returning pauses training within one mini-batch. It reports on stdout,
one typed report a line (:mod:`edge_runtime.worker_reports`): ``started``, ``paused``,
``resumed``, ``finished`` (with loss and the model's metric on the local held-out split,
before and after) or ``stopped`` (``failed`` when it raised); the new flat weights go to
``output`` (``np.save``, no pickle).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.spool import LabelledSet, Spool
from edge_runtime.worker_reports import (
    Failed,
    Finished,
    Paused,
    Resumed,
    Started,
    Stopped,
    WorkerReport,
    encode_report,
)
from fedcore.modelrun import make_optimizer, proximal_term, target_output, to_tensors
from fedcore.models import get_spec, use_models
from fedcore.params import flatten, load_flat, load_weights_file
from fedcore.spec import Feeds, ModelSpec, TrainingRecipe
from fedcore.task import metric_value, torch_loss
from fedcore.wire import ClientRecipe

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUN, PAUSE, STOP = 0, 1, 2
_CONTROL = struct.Struct("<qq")  # command, mini-batches done
CONTROL_BYTES = _CONTROL.size
_PAUSE_POLL_S = 0.01
Device = Literal["auto", "cpu", "cuda"]


def told(recipe: TrainingRecipe, announced: ClientRecipe | None) -> TrainingRecipe:
    """``recipe`` (the spec's, with the edge's settings over it) with what a round's
    announcement set over it."""
    return recipe if announced is None else recipe.overridden(**announced.model_dump())


def recipe_metrics(recipe: TrainingRecipe) -> dict[str, float]:
    """What a run with ``recipe`` reports in its update's signed metrics."""
    out = {
        "recipe_mu": recipe.proximal_mu,
        "recipe_lr": recipe.lr,
        "recipe_epochs": float(recipe.epochs),
        "recipe_batch_size": float(recipe.batch_size),
    }
    if recipe.max_steps is not None:
        out["recipe_max_steps"] = float(recipe.max_steps)
    return out


class JobSpec(BaseModel):
    """What one fine-tuning run does; written as JSON for the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    model_ref: str | None = None
    """the reference the edge resolved ``model`` from (a user's spec), resolved here too"""
    spool: Path
    base_weights: Path
    output: Path
    control: Path
    recipe: TrainingRecipe
    """what to train with: :func:`told` over the edge's recipe"""
    holdout_fraction: float = Field(default=0.2, ge=0, lt=1)
    device: Device = "auto"
    threads: int = Field(default=1, ge=1)
    nice: int = Field(default=19, ge=0, le=19)
    sched_idle: bool = True
    seed: int = 0
    parent_pid: int | None = None


class Control:
    """The 16-byte control block shared with the parent through a mapped file."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, CONTROL_BYTES)
        finally:
            os.close(fd)

    @staticmethod
    def create(path: Path) -> Control:
        path.write_bytes(_CONTROL.pack(RUN, 0))
        return Control(path)

    def command(self) -> int:
        return int(_CONTROL.unpack_from(self._map)[0])

    def set_command(self, command: int) -> None:
        struct.pack_into("<q", self._map, 0, command)

    def done(self) -> int:
        return int(_CONTROL.unpack_from(self._map)[1])

    def set_done(self, batches: int) -> None:
        struct.pack_into("<q", self._map, 8, batches)

    def close(self) -> None:
        self._map.close()


def select_device(preference: Device = "auto") -> torch.device:
    """CUDA when present (and not refused), CPU otherwise; the choice is logged."""
    import torch

    available = torch.cuda.is_available()
    use_cuda = available and preference != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    name = torch.cuda.get_device_name(0) if use_cuda else "cpu"
    if preference == "cuda" and not available:
        log.warning("training device: cuda asked for but not available; using cpu")
    log.info(
        "training device: %s (%s; cuda available: %s, asked: %s)",
        device,
        name,
        available,
        preference,
        extra={"device": str(device)},
    )
    return device


@dataclass(frozen=True)
class Evaluation:
    """Loss and the model's metric on the held-out split (None without held-out samples)."""

    loss: float | None
    value: float | None
    count: int


def evaluate(
    spec: ModelSpec, module: torch.nn.Module, x: Feeds, y: NDArray[Any], device: Any
) -> Evaluation:
    import torch

    if len(y) == 0:
        return Evaluation(None, None, 0)
    module.eval()
    with torch.no_grad():
        out = target_output(spec, module, to_tensors(spec, x, device))
        target = torch.from_numpy(y).to(device)
        loss = float(torch_loss(spec.task, out, target).mean())
        value = metric_value(spec.task, out.cpu().numpy(), y)
    module.train()
    return Evaluation(loss, value, len(y))


Emit = Callable[[WorkerReport], None]


@dataclass
class Trainer:
    """The mini-batch loop with its pause points."""

    job: JobSpec
    control: Control
    emit: Emit
    spec: ModelSpec

    def wait_if_paused(self, done: int) -> bool:
        """Between mini-batches: pause while told to; False when told to stop."""
        command = self.control.command()
        if command == RUN:
            return True
        if command == PAUSE:
            self.emit(Paused(batch=done))
            while (command := self.control.command()) == PAUSE:
                time.sleep(_PAUSE_POLL_S)
            if command == RUN:
                self.emit(Resumed(batch=done))
                return True
        self.emit(Stopped(batch=done))
        return False

    def fit(
        self, module: torch.nn.Module, data: LabelledSet, device: Any, started: Started
    ) -> int | None:
        """Train ``module`` in place; the number of mini-batches, or None if stopped.

        ``started`` is reported once everything is set up (the optimiser's first use
        alone can take a second), right before the first mini-batch's pause point.
        """
        import torch

        r = self.job.recipe
        x = to_tensors(self.spec, data.x_train, device)
        y = torch.from_numpy(data.y_train).to(device)
        w = torch.from_numpy(data.w_train).to(device)
        anchor = [p.detach().clone() for p in module.parameters()]
        opt = make_optimizer(r, module)
        opt.zero_grad()
        generator = torch.Generator().manual_seed(self.job.seed)
        done = 0
        self.emit(started)
        limit = r.max_steps if r.max_steps is not None else -1
        for _ in range(r.epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), r.batch_size):
                if done == limit:
                    return done
                if not self.wait_if_paused(done):
                    return None
                idx = order[start : start + r.batch_size]
                out = target_output(self.spec, module, [t[idx] for t in x])
                per_sample = torch_loss(self.spec.task, out, y[idx])
                loss = (per_sample * w[idx]).sum() / w[idx].sum()
                if r.proximal_mu > 0:
                    loss = loss + proximal_term(module.parameters(), anchor, r.proximal_mu)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
                opt.step()
                done += 1
                self.control.set_done(done)
        return done


def run_job(job: JobSpec, control: Control, emit: Emit) -> None:
    """Fine-tune as ``job`` says, reporting through ``emit`` (the worker's whole work)."""
    import torch

    torch.manual_seed(job.seed)
    torch.set_num_threads(job.threads)
    device = select_device(job.device)
    if job.model_ref is not None and job.model_ref != job.model:
        use_models([job.model_ref], deep=False)
    spec = get_spec(job.model)
    spool = Spool(job.spool)
    try:
        data = spool.labelled(spec, job.holdout_fraction)
    finally:
        spool.close()
    module = spec.build_module()
    base = load_weights_file(job.base_weights, expected=flatten(module).size)
    load_flat(module, base)
    module.to(device).train()
    before = evaluate(spec, module, data.x_holdout, data.y_holdout, device)
    started = Started(
        samples=len(data.y_train),
        holdout=len(data.y_holdout),
        upto=data.upto,
        device=str(device),
    )
    if len(data.y_train) == 0:
        emit(started)
        emit(Stopped(batch=0, reason="no training samples"))
        return
    batches = Trainer(job, control, emit, spec).fit(module, data, device, started)
    if batches is None:
        return
    after = evaluate(spec, module, data.x_holdout, data.y_holdout, device)
    np.save(job.output, flatten(module).astype("<f4"), allow_pickle=False)
    emit(
        Finished(
            batch=batches,
            samples=len(data.y_train),
            holdout=after.count,
            upto=data.upto,
            loss=after.loss,
            base_loss=before.loss,
            metric=spec.task.metric,
            value=after.value,
            base_value=before.value,
        )
    )


def _emit_line(report: WorkerReport) -> None:
    sys.stdout.write(encode_report(report) + "\n")
    sys.stdout.flush()


def _detach_from_serving(job: JobSpec) -> None:
    """Die with the parent, and yield the CPU to everything else on the machine."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if job.parent_pid is not None and os.getppid() != job.parent_pid:
        raise SystemExit("parent already gone")
    if job.nice:
        os.nice(job.nice)
    if job.sched_idle and hasattr(os, "SCHED_IDLE"):
        # Linux SCHED_IDLE: run only on CPU time nothing else wants; a waking serving
        # thread takes this CPU as if it were idle (threads created later inherit it).
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m edge_runtime.finetune <job.json>``."""
    from fedcore.logs import configure_logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m edge_runtime.finetune <job.json>\n")
        return 2
    job = JobSpec.model_validate_json(Path(args[0]).read_bytes())
    configure_logging(f"finetune:{job.model}", os.environ.get("FEDGATE_EDGE_LOG_LEVEL", "INFO"))
    _detach_from_serving(job)
    control = Control(job.control)
    try:
        run_job(job, control, _emit_line)
    except Exception as exc:
        log.exception("fine-tuning failed")
        _emit_line(Failed(reason=f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        control.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
