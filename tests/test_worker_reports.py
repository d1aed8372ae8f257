"""The fine-tuning worker's reports are typed (edge_runtime.worker_reports) on both sides:
the worker writes them, the learner's handle decodes each line strictly and drops what
is no report."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from edge_runtime.finetune import Control, JobSpec
from edge_runtime.worker import FinetuneWorker
from edge_runtime.worker_reports import (
    Exited,
    Failed,
    Finished,
    Paused,
    Resumed,
    Started,
    Stopped,
    WorkerReport,
    decode_report,
    encode_report,
)
from fedcore.models import get_spec

FINISHED = Finished(
    batch=12,
    samples=160,
    holdout=40,
    upto=200,
    loss=0.25,
    base_loss=0.5,
    metric="accuracy",
    value=0.9,
    base_value=0.8,
)
REPORTS: list[WorkerReport] = [
    Started(samples=160, holdout=40, upto=200, device="cpu"),
    Paused(batch=3),
    Resumed(batch=3),
    Stopped(batch=0, reason="no training samples"),
    FINISHED,
    Failed(reason="RuntimeError: boom"),
    Exited(code=0),
]


@pytest.mark.parametrize("report", REPORTS, ids=[r.event for r in REPORTS])
def test_every_report_survives_its_line(report: WorkerReport) -> None:
    line = encode_report(report)
    assert "\n" not in line
    assert decode_report(line) == report
    assert decode_report(line.encode()) == report


def test_a_finished_report_names_its_metric() -> None:
    assert FINISHED.figures() == {
        "loss": 0.25,
        "base_loss": 0.5,
        "accuracy": 0.9,
        "base_accuracy": 0.8,
    }
    nan = FINISHED.model_copy(update={"loss": float("nan")})
    assert decode_report(encode_report(nan)).loss is None  # not finite: no figure


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "paused", "batch": 1, "batch": 2}',  # a repeated key
        b'{"event": "paused", "batch": 1, "extra": 0}',  # an unknown field
        b'{"event": "paused"}',  # a missing field
        b'{"event": "paused", "batch": "1"}',  # a number as a string
        b'{"event": "paused", "batch": true}',
        b'{"event": "paused", "batch": -1}',
        b'{"event": "trained", "batch": 1}',  # no such report
        b'{"batch": 1}',
        b"[1, 2]",
        b"not json",
        b"\xff\xfe",
    ],
)
def test_a_line_that_is_no_report_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_report(line)


async def test_the_handle_keeps_only_reports(tmp_path: Path) -> None:
    """A worker writing junk between reports: the learner sees the reports, then exited."""
    lines = [
        encode_report(Paused(batch=1)),
        '{"event": "paused", "batch": 2, "extra": 1}',
        '{"event": "resumed", "batch": 2, "batch": 3}',
        "a log line on stdout",
        encode_report(FINISHED),
    ]
    script = "import sys\nfor line in sys.argv[1:]:\n    print(line)\n"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *lines, stdout=asyncio.subprocess.PIPE
    )
    job = JobSpec(
        model="digits",
        spool=tmp_path / "spool",
        base_weights=tmp_path / "base.npy",
        output=tmp_path / "local.npy",
        control=tmp_path / "control.bin",
        recipe=get_spec("digits").recipe,
    )
    worker = FinetuneWorker(job, proc, Control.create(job.control))
    assert await worker.close() == 0
    assert worker.drain() == [Paused(batch=1), FINISHED, Exited(code=0)]
