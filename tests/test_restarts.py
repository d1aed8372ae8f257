"""``fedgate.restarts``: the launcher's restarts of exited services, with real processes.

Small stand-in services (a Python that sleeps, one that exits at once, one that needs a
port) instead of the stack's: the policy is the same, the timings are short.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from fedcore.process import ManagedProcess, free_port
from fedgate.restarts import STATUS_FILE, CrashLoop, ProcessSupervisor, RestartPolicy, read_status
from fedgate.status import print_status

FAST = RestartPolicy(base_s=0.1, max_s=0.4, crash_loop_failures=3, crash_loop_window_s=30)


def service(
    tmp_path: Path, name: str, code: str, ports: dict[str, int] | None = None
) -> ManagedProcess:
    argv = [sys.executable, "-c", code]
    return ManagedProcess(name, argv, log_path=tmp_path / f"{name}.log", ports=ports)


def until(supervisor: ProcessSupervisor, condition: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        supervisor.check()
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_killed_service_is_restarted_and_the_status_file_says_so(tmp_path: Path) -> None:
    supervisor = ProcessSupervisor(tmp_path / STATUS_FILE, FAST)
    proc = service(tmp_path, "svc", "import time; print('up', flush=True); time.sleep(60)")
    proc.start()
    supervisor.add(proc)
    try:
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        until(supervisor, lambda: proc.pid != first and proc.exited() is None)
        assert time.monotonic() - killed >= 0.08  # after the backoff delay, not at once
        status = read_status(tmp_path)
        assert status is not None
        (row,) = status["processes"]
        assert row["name"] == "svc" and row["state"] == "running" and row["pid"] == proc.pid
        assert row["restarts"] == 1 and row["last_exit"] == "killed by SIGKILL"
        assert supervisor.restarts() == {"svc": 1}
    finally:
        proc.stop(timeout=2)


def test_a_crash_loop_names_the_service_and_its_log(tmp_path: Path) -> None:
    supervisor = ProcessSupervisor(tmp_path / STATUS_FILE, FAST)
    proc = service(tmp_path, "broken", "import sys; print('no config here'); sys.exit(3)")
    proc.start()
    supervisor.add(proc)
    with pytest.raises(CrashLoop) as info:
        until(supervisor, lambda: False)
    err = info.value
    assert err.name == "broken" and err.last == "exit code 3"
    assert "3 failures within 30s" in str(err) and "no config here" in str(err)
    rows = json.loads((tmp_path / STATUS_FILE).read_text())["processes"]
    assert rows[0]["state"] == "failed" and rows[0]["restarts"] == 2


def test_a_start_that_fails_counts_toward_the_crash_loop(tmp_path: Path) -> None:
    port = free_port()
    supervisor = ProcessSupervisor(tmp_path / STATUS_FILE, FAST)
    proc = service(tmp_path, "server", "import time; time.sleep(60)", ports={"http": port})
    proc.start()
    supervisor.add(proc)
    taken = socket.socket()
    try:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(CrashLoop, match="port-in-use"):
            until(supervisor, lambda: False)
    finally:
        taken.close()
        proc.stop(timeout=2)


def test_status_shows_the_processes_even_when_the_gateway_is_down(tmp_path: Path) -> None:
    supervisor = ProcessSupervisor(tmp_path / STATUS_FILE, FAST)
    proc = service(tmp_path, "edge-1", "import time; time.sleep(60)")
    proc.start()
    supervisor.add(proc)
    lines: list[str] = []
    try:
        with pytest.raises(Exception, match="cannot reach the gateway"):
            print_status(f"http://127.0.0.1:{free_port()}", lines.append, data_dir=tmp_path)
    finally:
        proc.stop(timeout=2)
    text = "\n".join(lines)
    assert f"Processes (fedgate up, pid {os.getpid()}" in text
    assert "edge-1" in text and "running" in text and "restarts" in text
    assert read_status(tmp_path / "elsewhere") is None
