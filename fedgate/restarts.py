"""Restarts of the local stack's service processes (``fedgate up``, ``fedgate demo``).

:class:`ProcessSupervisor` is stepped by its owner (:meth:`ProcessSupervisor.check`,
non-blocking, from the thread that started the processes: their death signal follows
it). A process that exits is logged with its exit status and the tail of its log and
started again, with the same command, environment and ports, after a delay that doubles
from ``base_s`` up to ``max_s`` (with jitter; back to ``base_s`` once it stayed up
``stable_s``). A start that fails (a port still taken, a binary gone) counts as an exit.
``crash_loop_failures`` exits within ``crash_loop_window_s`` are a crash loop: ``check``
raises :class:`CrashLoop` naming the service, why, and the tail of its log, and the
owner stops the stack.

Every change is written to the status file (``<data-dir>/launcher-status.json``, JSON:
the launcher's pid, and per process its state, pid, restarts, last exit), which
``fedgate status`` prints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.errors import FedgateError, ProcessError
from fedcore.files import write_atomic
from fedcore.loops import Backoff
from fedcore.process import ManagedProcess

log = logging.getLogger(__name__)

STATUS_FILE = "launcher-status.json"


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart an exited service, and when to give up on it."""

    base_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0
    crash_loop_failures: int = 5
    crash_loop_window_s: float = 120.0


class CrashLoop(FedgateError):
    """A service kept exiting (or failing to start): the stack gives up on it."""

    def __init__(self, name: str, failures: int, window_s: float, last: str, tail: str) -> None:
        self.name = name
        self.last = last
        self.tail = tail
        super().__init__(
            f"{name} keeps failing: {failures} failures within {window_s:.0f}s, the last "
            f"{last}; stopping the stack. Last lines of its log:\n{tail}"
        )


def describe_exit(code: int) -> str:
    """``exit code 1``, or ``killed by SIGKILL`` for a negative code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Tracked:
    """One supervised process and its restart history."""

    process: ManagedProcess
    backoff: Backoff
    state: str = "running"  # running, restarting, failed, stopped
    restarts: int = 0
    failures: deque[float] = field(default_factory=deque)  # monotonic times, in the window
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None
    last_exit: str | None = None
    last_exit_ts: float | None = None


class ProcessSupervisor:
    """Restarts exited processes with backoff; raises :class:`CrashLoop`."""

    def __init__(
        self,
        status_file: Path,
        policy: RestartPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.status_file = status_file
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.extra = extra  # more for the status file (the stack's URLs)
        self.tracked: dict[str, Tracked] = {}

    def add(self, process: ManagedProcess) -> None:
        p = self.policy
        backoff = Backoff(p.base_s, p.max_s)
        self.tracked[process.name] = Tracked(process, backoff, started_at=self.clock())
        self.write_status()

    def check(self) -> None:
        """Notice exits, restart what is due; raises :class:`CrashLoop`."""
        changed = False
        for t in self.tracked.values():
            now = self.clock()
            if t.state == "running":
                if now - t.started_at >= self.policy.stable_s:
                    t.backoff.reset()
                code = t.process.exited()
                if code is not None:
                    self._exited(t, describe_exit(code), now)
                    changed = True
            elif t.state == "restarting" and t.restart_at is not None and now >= t.restart_at:
                self._restart(t, now)
                changed = True
        if changed:
            self.write_status()

    def _exited(self, t: Tracked, why: str, now: float) -> None:
        name = t.process.name
        try:
            t.process.stop(timeout=1.0)  # reap it and whatever of its group is left
        except ProcessError as exc:
            log.error("%s", exc)
        tail = t.process.log_tail(10)
        t.last_exit, t.last_exit_ts = why, time.time()
        t.failures.append(now)
        while t.failures and now - t.failures[0] > self.policy.crash_loop_window_s:
            t.failures.popleft()
        if len(t.failures) >= self.policy.crash_loop_failures:
            t.state = "failed"
            self.write_status()
            raise CrashLoop(name, len(t.failures), self.policy.crash_loop_window_s, why, tail)
        delay = t.backoff.next()
        t.state, t.restart_at = "restarting", now + delay
        log.error(
            "%s %s; restarting it in %.1fs (restart %d)",
            name,
            why,
            delay,
            t.restarts + 1,
            extra={"proc": name, "exit": why, "log_tail": tail},
        )

    def _restart(self, t: Tracked, now: float) -> None:
        t.restarts += 1
        try:
            t.process.start()
        except ProcessError as exc:
            self._exited(t, f"failed to start ({exc.reason}: {exc.detail})", now)
            return
        t.state, t.started_at, t.restart_at = "running", now, None
        log.warning(
            "restarted %s (restart %d)",
            t.process.name,
            t.restarts,
            extra={"proc": t.process.name, "child_pid": t.process.pid, "restarts": t.restarts},
        )

    def mark_stopped(self) -> None:
        for t in self.tracked.values():
            t.state = "stopped"
        self.write_status()

    def restarts(self) -> dict[str, int]:
        return {name: t.restarts for name, t in self.tracked.items()}

    def write_status(self) -> None:
        write_atomic(self.status_file, json.dumps(self.status(), indent=1).encode())

    def status(self) -> dict[str, Any]:
        now = self.clock()
        rows = [
            {
                "name": name,
                "state": t.state,
                "pid": t.process.pid if t.state == "running" else None,
                "restarts": t.restarts,
                "up_s": round(now - t.started_at, 1) if t.state == "running" else None,
                "last_exit": t.last_exit,
                "last_exit_ts": t.last_exit_ts,
            }
            for name, t in self.tracked.items()
        ]
        return {"launcher_pid": os.getpid(), "ts": time.time(), "processes": rows} | self.extra()


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """The status a running launcher wrote under ``data_dir`` (None: none runs there)."""
    try:
        status: dict[str, Any] = json.loads((data_dir / STATUS_FILE).read_text())
        os.kill(int(status["launcher_pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status


def status_rows(
    status: dict[str, Any], triton_restarts: Sequence[int | None]
) -> list[list[object]]:
    """Rows of ``fedgate status``'s process table; ``triton_restarts`` per process (the
    edges' Triton restarts, None where it does not apply or is unknown)."""
    rows: list[list[object]] = []
    for p, triton in zip(status["processes"], triton_restarts, strict=True):
        last = p.get("last_exit")
        if last and p.get("last_exit_ts"):
            ago = time.time() - float(p["last_exit_ts"])
            last = f"{last} ({ago:.0f}s ago)"
        rows.append([p["name"], p["state"], p.get("pid"), p["restarts"], triton, last])
    return rows
