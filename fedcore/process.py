"""Supervision of real server processes: start, wait until ready, stop, leave nothing behind.

Each process starts in a session of its own (its own process group), so stopping it also
reaches its children, such as Triton's python-backend stub. On Linux the child gets
SIGTERM if its supervisor dies (``PR_SET_PDEATHSIG``). Start processes from the main
thread: the death signal follows the thread that forked.

With a ``pid_file``, a process left behind by a supervisor that was itself killed (its
child got the death signal but may still be draining) is found at the next start and
killed with its group before the new one starts on the same ports.
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


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def kill_group(pgid: int, grace: float = 5.0) -> None:
    """SIGKILL every member of process group ``pgid`` until none is left (the caller reaps
    its own children). Raises :class:`ProcessError` when members survive ``grace``."""
    deadline = time.monotonic() + grace
    while members := group_members(pgid):
        if time.monotonic() > deadline:
            raise ProcessError(f"group {pgid}", "orphans", f"processes {members} survived SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)


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
        pid_file: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ports = dict(ports or {})
        self.stop_signal = stop_signal
        self.pid_file = pid_file
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
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{self._proc.pid}\n")
        log.info("started %s", self.name, extra={"proc": self.name, "child_pid": self._proc.pid})

    def previous_group(self) -> int | None:
        """The process group of a previous run of this same command (``pid_file`` names a
        live process whose command line is exactly ``argv``), else None."""
        if self.pid_file is None or (self._proc is not None and self._proc.poll() is None):
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if cmdline(pid) != " ".join(self.argv):
            return None
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return None

    def members(self) -> list[int]:
        """Live members of the process's group (the process and its children)."""
        return group_members(self._proc.pid) if self._proc is not None else []

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
        return self._reaped(proc)

    def kill(self) -> int | None:
        """SIGKILL the whole group now (a hung or dead process: no drain), reap it.
        Idempotent. Returns the exit code (None if it was never started)."""
        proc = self._proc
        if proc is None:
            return None
        self._kill_group(proc.pid)
        return self._reaped(proc)

    def _reaped(self, proc: subprocess.Popen[bytes]) -> int:
        code = proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.pid_file is not None:
            with contextlib.suppress(OSError):
                if self.pid_file.read_text().strip() == str(proc.pid):
                    self.pid_file.unlink()
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
