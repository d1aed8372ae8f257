"""``fedgate up`` as a user runs it, in its own process, for the chaos run: it supervises
the services itself (an exited one is restarted), and the chaos run finds their pids in
``<data-dir>/launcher-status.json`` (what ``fedgate status`` reads)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedcore.keys import read_secret


class UpStack:
    """A running ``fedgate up --edges N --port P --data-dir D [--set ...]``."""

    def __init__(self, proc: subprocess.Popen[str], output: list[str], data_dir: Path) -> None:
        self.proc = proc
        self.output = output
        self.data_dir = data_dir
        ready = next(line for line in output if line.startswith("gateway:"))
        self.gateway_url = ready.split()[1]
        self.nats_url = next(ln.split()[1] for ln in output if ln.startswith("nats:"))
        self.edge_ids = sorted(
            ln.split(":")[0] for ln in output if ln.startswith("edge-") and "triton" in ln
        )
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    @classmethod
    def start(cls, data_dir: Path, edges: int, port: int, sets: list[str]) -> UpStack:
        """Start ``fedgate up`` and wait (up to 300 s) until it printed ``ready;``."""
        argv = [sys.executable, "-m", "fedgate.cli", "up", "--edges", str(edges)]
        argv += ["--port", str(port), "--data-dir", str(data_dir)]
        for item in sets:
            argv += ["--set", item]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("ready;"):
                return cls(proc, output, data_dir)
        proc.kill()
        proc.wait()
        raise RuntimeError("fedgate up did not become ready:\n" + "".join(output[-30:]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def api_key(self, role: str = "infer") -> str:
        return read_secret(self.data_dir / "secrets" / f"gateway-{role}.key")

    def _status(self) -> dict[str, dict[str, object]]:
        doc = json.loads((self.data_dir / "launcher-status.json").read_text())
        return {p["name"]: p for p in doc["processes"]}

    def pid(self, name: str) -> int:
        """The running process ``name`` (``trainer``, ``edge-2``, ``gateway``...)."""
        pid = self._status()[name]["pid"]
        if not isinstance(pid, int):
            raise RuntimeError(f"{name} is not running: {self._status()[name]}")
        return pid

    def restarts(self) -> dict[str, int]:
        return {name: int(str(p["restarts"])) for name, p in self._status().items()}

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM to ``fedgate up`` (it stops every service); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(timeout=5)
        return int(self.proc.returncode)
