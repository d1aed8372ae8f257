"""Local fine-tuning: the training itself in process, and the real worker process paused,
resumed and stopped through its control block."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_runtime.finetune import (
    PAUSE,
    Control,
    JobSpec,
    run_job,
    select_device,
)
from edge_runtime.spool import Spool, spool_path
from edge_runtime.worker import FinetuneWorker
from edge_runtime.worker_reports import (
    Exited,
    Failed,
    Finished,
    Paused,
    Resumed,
    Started,
    WorkerReport,
)
from fedcore.modelrun import proximal_term
from fedcore.models import get_spec
from fedcore.params import load_weights_file
from fedcore.spec import TrainingRecipe
from tests.conftest import SignedArtifacts, processes_mentioning
from tests.test_edge_spool import capture_module


def labelled_spool(root: Path, samples: int = 200) -> Path:
    """A spool with ``samples`` captured and labelled digits (as the edge would have)."""
    path = spool_path(root, "digits")
    Spool(path).close()
    x, y, _, _ = get_spec("digits").dataset()
    writer = capture_module()["CaptureWriter"](str(path), 1.0, 10_000, 10_000, version=1)
    for i in range(samples):
        writer.offer(f"req-{i}", [x[i : i + 1]], [np.zeros((1, 10), np.float32)])
    writer.close()
    spool = Spool(path)
    for i in range(samples):
        spool.join_label(f"req-{i}", int(y[i]))
    spool.close()
    return path


def job(root: Path, signed: SignedArtifacts, **recipe: Any) -> JobSpec:
    base = root / "base.npy"
    np.save(base, signed.params.astype("<f4"), allow_pickle=False)
    return JobSpec(
        model="digits",
        spool=labelled_spool(root),
        base_weights=base,
        output=root / "local.npy",
        control=root / "control.bin",
        recipe=TrainingRecipe(**recipe),
        device="cpu",
        nice=0,  # normal priority: the test asserts behaviour, not scheduling
        sched_idle=False,
    )


def test_training_improves_on_the_base(tmp_path: Path, signed_v1: SignedArtifacts) -> None:
    spec = job(tmp_path, signed_v1, epochs=20, lr=0.05, proximal_mu=0.001)
    reports: list[WorkerReport] = []
    run_job(spec, Control.create(spec.control), reports.append)
    started, finished = reports[0], reports[-1]
    assert isinstance(started, Started) and started.device == "cpu"
    assert started.samples + started.holdout == 200 and started.holdout > 20
    assert isinstance(finished, Finished) and finished.metric == "accuracy"
    assert finished.batch == 20 * -(-started.samples // 32)
    assert finished.value is not None and finished.base_value is not None
    assert finished.value > finished.base_value
    assert finished.loss is not None and finished.base_loss is not None
    assert finished.loss < finished.base_loss
    local = load_weights_file(spec.output, expected=signed_v1.params.size)
    assert not np.array_equal(local, signed_v1.params)


def test_proximal_term_and_device() -> None:
    w = [torch.ones(3, requires_grad=True)]
    g = [torch.zeros(3)]
    term = proximal_term(w, g, mu=0.5)
    assert float(term.detach()) == pytest.approx(0.75)  # 0.5 / 2 * 3
    term.backward()  # type: ignore[no-untyped-call]
    assert w[0].grad is not None and torch.allclose(w[0].grad, torch.full((3,), 0.5))
    assert str(select_device("cpu")) == "cpu"
    assert str(select_device("auto")) == ("cuda" if torch.cuda.is_available() else "cpu")


async def next_report(
    worker: FinetuneWorker, kind: type[WorkerReport], timeout_s: float = 30
) -> WorkerReport:
    async with asyncio.timeout(timeout_s):
        while True:
            report = await worker.reports.get()
            if isinstance(report, kind):
                return report
            assert not isinstance(report, Failed | Exited), report


async def test_worker_pauses_between_mini_batches_resumes_and_stops(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    spec = job(tmp_path, signed_v1, epochs=100_000, batch_size=4)
    worker = await FinetuneWorker.start(spec, tmp_path / "job")
    try:
        await next_report(worker, Started)
        for _ in range(500):  # the first mini-batches (torch warms up)
            if worker.batches_done >= 10:
                break
            await asyncio.sleep(0.02)
        at_pause = worker.pause()
        assert worker.control.command() == PAUSE
        paused = await next_report(worker, Paused)
        assert isinstance(paused, Paused) and 0 < paused.batch <= at_pause + 1
        await asyncio.sleep(0.3)
        assert worker.batches_done == paused.batch  # nothing runs while paused
        worker.resume()
        resumed = await next_report(worker, Resumed)
        assert isinstance(resumed, Resumed) and resumed.batch == paused.batch
        await asyncio.sleep(0.2)
        assert worker.batches_done > paused.batch
    finally:
        code = await worker.close()
    assert code == 0
    assert [r.event for r in worker.drain()][-2:] == ["stopped", "exited"]
    assert processes_mentioning(str(tmp_path)) == []
