"""Process supervision: clear errors on start, nothing left behind on stop."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from fedcore.errors import ProcessError
from fedcore.process import ManagedProcess, free_port, group_members, port_in_use


def test_missing_binary_is_named(tmp_path: Path) -> None:
    proc = ManagedProcess("thing", ["/nonexistent/tritonserver"], log_path=tmp_path / "l.log")
    with pytest.raises(ProcessError) as info:
        proc.start()
    assert info.value.reason == "binary-missing"
    assert "/nonexistent/tritonserver" in str(info.value)


def test_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
        proc = ManagedProcess(
            "srv", [sys.executable, "-c", "pass"], log_path=tmp_path / "l.log", ports={"http": port}
        )
        with pytest.raises(ProcessError, match=f"http port {port} is already in use") as info:
            proc.start()
        assert info.value.reason == "port-in-use"
    assert not port_in_use(free_port())


def test_early_exit_reports_log_tail(tmp_path: Path) -> None:
    code = "import sys; print('model digits failed: bad onnx', flush=True); sys.exit(3)"
    proc = ManagedProcess("srv", [sys.executable, "-c", code], log_path=tmp_path / "l.log")
    proc.start()
    with pytest.raises(ProcessError) as info:
        proc.wait_ready(lambda: False, timeout=20)
    assert info.value.reason == "exited"
    assert "exit code 3" in str(info.value) and "model digits failed: bad onnx" in str(info.value)
    proc.stop()


def test_readiness_timeout(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "srv", [sys.executable, "-c", "import time; time.sleep(30)"], log_path=tmp_path / "l.log"
    )
    proc.start()
    try:
        with pytest.raises(ProcessError, match="not ready after 0s") as info:
            proc.wait_ready(lambda: False, timeout=0.3)
        assert info.value.reason == "timeout"
    finally:
        proc.stop(timeout=5)


def test_stop_reaps_children_that_ignore_sigterm(tmp_path: Path) -> None:
    # a parent that exits on SIGTERM, leaving a child that ignores it (like a stuck stub)
    script = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = ManagedProcess("parent", [sys.executable, "-c", script], log_path=tmp_path / "l.log")
    proc.start()
    proc.wait_ready(lambda: "child" in (tmp_path / "l.log").read_text(), timeout=20)
    pgid = proc.pid
    assert pgid is not None and len(group_members(pgid)) == 2
    t0 = time.monotonic()
    proc.stop(timeout=2)
    assert group_members(pgid) == []
    assert time.monotonic() - t0 < 10
    assert proc.stop() is not None  # idempotent
