"""Supervision of real server processes: start, wait until ready, stop, leave nothing behind.

Each process starts in a session of its own (its own process group), so stopping it also
reaches its children, such as Triton's python-backend stub. On Linux the child gets
SIGTERM if its supervisor dies (``PR_SET_PDEATHSIG``). Start processes from the main
thread: the death signal follows the thread that forked.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from fedcore.errors import ProcessError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on ``host:port``.

    ``SO_REUSEADDR`` as servers set it: a port in TIME_WAIT from a previous run is free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (reads /proc; zombies excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat_line[stat_line.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


class ManagedProcess:
    """One supervised server process with a log file, a readiness probe and a stop deadline."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ports: Mapping[str, int] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ports = dict(ports or {})
        self.stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Check binary and ports, then start. Raises :class:`ProcessError` with the cause."""
        binary = self.argv[0]
        if shutil.which(binary) is None and not (
            Path(binary).is_file() and os.access(binary, os.X_OK)
        ):
            raise ProcessError(
                self.name, "binary-missing", f"{binary!r} not found or not executable"
            )
        for what, port in self.ports.items():
            if port_in_use(port):
                raise ProcessError(
                    self.name, "port-in-use", f"{what} port {port} is already in use"
                )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_set_parent_death_signal,  # noqa: PLW1509 - no threads touch it
        )
        log.info("started %s", self.name, extra={"proc": self.name, "child_pid": self._proc.pid})

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the process log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self._proc.poll() if self._proc else None

    def wait_ready(self, probe: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
        """Poll ``probe`` until it is true; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.exited()
            if code is not None:
                raise ProcessError(
                    self.name,
                    "exited",
                    f"exit code {code} before ready; log tail:\n{self.log_tail()}",
                )
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise ProcessError(
                    self.name,
                    "timeout",
                    f"not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}",
                )
            time.sleep(interval)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Signal the process group, wait up to ``timeout``, then SIGKILL what is left.

        Idempotent. Returns the exit code (None if it was never started).
        """
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, self.stop_signal)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing", self.name, timeout)
        self._kill_group(pgid)
        code = proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def _kill_group(self, pgid: int, grace: float = 5.0) -> None:
        """SIGKILL every member of the group still alive (stubs and other children)."""
        deadline = time.monotonic() + grace
        while members := group_members(pgid):
            if time.monotonic() > deadline:
                raise ProcessError(self.name, "orphans", f"processes {members} survived SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.05)
            time.sleep(0.05)
