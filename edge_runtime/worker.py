"""The learner's handle on one fine-tuning worker process (``edge_runtime.finetune``).

Starts the worker with the job written as JSON, shares the 16-byte control block with
it through a mapped file (pause, resume, stop; mini-batches done), reads its typed
reports (:mod:`edge_runtime.worker_reports`, one JSON line each, decoded strictly) into a
queue, and stops it with a deadline (SIGKILL after), leaving nothing behind. The
worker's stderr (its logs) goes to the edge's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from edge_runtime.finetune import PAUSE, RUN, STOP, Control, JobSpec
from edge_runtime.worker_reports import Exited, WorkerReport, decode_report

log = logging.getLogger(__name__)

_MAX_LINE = 64 * 1024


class FinetuneWorker:
    """One running fine-tuning job."""

    def __init__(self, job: JobSpec, proc: asyncio.subprocess.Process, control: Control) -> None:
        self.job = job
        self.proc = proc
        self.control = control
        self.reports: asyncio.Queue[WorkerReport] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._closed = False

    @classmethod
    async def start(cls, job: JobSpec, work_dir: Path) -> FinetuneWorker:
        """Write the job and the control block under ``work_dir`` and start the worker."""
        job, control, job_file = _prepare(job, work_dir)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edge_runtime.finetune",
            str(job_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            limit=_MAX_LINE,
        )
        log.info("fine-tuning worker started", extra={"child_pid": proc.pid, "model": job.model})
        return cls(job, proc, control)

    @property
    def batches_done(self) -> int:
        return self.control.done()

    @property
    def paused(self) -> bool:
        return self.control.command() == PAUSE

    def pause(self) -> int:
        """Ask the worker to stop before its next mini-batch; the batches done now."""
        self.control.set_command(PAUSE)
        return self.control.done()

    def resume(self) -> None:
        self.control.set_command(RUN)

    async def _read(self) -> None:
        stream = self.proc.stdout
        if stream is None:
            return
        while line := await stream.readline():
            try:
                report = decode_report(line)
            except ValueError as exc:
                log.warning("fine-tuning worker wrote a line that is no report: %s", exc)
                continue
            self.reports.put_nowait(report)
        code = await self.proc.wait()
        self.reports.put_nowait(Exited(code=code))

    def drain(self) -> list[WorkerReport]:
        """Reports received so far, oldest first."""
        out = []
        while not self.reports.empty():
            out.append(self.reports.get_nowait())
        return out

    async def close(self, timeout_s: float = 5.0) -> int | None:
        """Stop the worker (if running) and reap it; one that has not exited within
        ``timeout_s`` is killed (it holds nothing: the spool was read at its start).
        Idempotent; the exit code."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        if self.proc.returncode is None:
            self.control.set_command(STOP)
            if self.job.sched_idle and hasattr(os, "SCHED_OTHER"):
                # a SCHED_IDLE worker may get no CPU at all on a busy machine: let it
                # run (still at its nice level) so that it can see the stop and exit
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(self.proc.pid, os.SCHED_OTHER, os.sched_param(0))
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("fine-tuning worker did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._reader, 1.0)
        self.control.close()
        return self.proc.returncode


def _prepare(job: JobSpec, work_dir: Path) -> tuple[JobSpec, Control, Path]:
    """The job with this process as parent, its control block, and its JSON file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job = job.model_copy(update={"parent_pid": os.getpid()})
    control = Control.create(job.control)
    job_file = work_dir / "job.json"
    job_file.write_text(job.model_dump_json())
    return job, control, job_file
