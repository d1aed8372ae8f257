"""Two models on one fleet, side by side, as a user runs it: ``fedgate demo --model digits
--model diabetes`` against real nats-server, tritonservers, edge runtimes, trainer and
gateway. Each model gets its own rounds, gated on its own metric (accuracy, MAE), its own
released versions and canary rollouts, and must end better than its version 1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.process import free_port
from tests.conftest import processes_mentioning

pytestmark = pytest.mark.slow


def test_two_models_each_release_and_roll_out(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgate.cli",
            "demo",
            "--model",
            "digits",
            "--model",
            "diabetes",
            "--edges",
            "2",
            "--rounds",
            "3",
            "--port",
            str(free_port()),
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    for model, metric in (("digits", "accuracy"), ("diabetes", "mae")):
        mine = [line for line in out.splitlines() if line.startswith(f"[{model}] ")]
        released = [
            line for line in mine if re.search(r"round \d: released \(held-out " + metric, line)
        ]
        promoted = [line for line in mine if re.search(r"rollout of v\d+ promoted", line)]
        assert released and promoted, "\n".join(mine)
        header = next(line for line in mine if "round  edges" in line)
        assert metric in header.split()
        passed = f"demo passed: the federated model is better than version 1 on {metric}"
        assert any(passed in line for line in mine)
        # each model's versions are its own: its released version numbers start at 2
        assert (data_dir / "trainer" / "artifacts" / model / "2").is_dir()
    assert processes_mentioning(str(data_dir)) == []
