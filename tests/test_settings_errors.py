"""A service started with missing or invalid settings says which variables and why, and
exits 2 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedcore.errors import ConfigError
from fedcore.settings import settings_from_env
from trainer.settings import TrainerSettings

CASES = {
    "trainer": ("FEDGATE_TRAINER_", {"FEDGATE_TRAINER_SECAGG": '{"digits": {"clip_norm": -1}}'}),
    "edge_runtime": ("FEDGATE_EDGE_", {"FEDGATE_EDGE_CAPTURE_RATE": "2.5"}),
    "gateway": ("FEDGATE_GATEWAY_", {"FEDGATE_GATEWAY_PORT": "not-a-port"}),
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_service_names_each_bad_setting_and_exits_2(module: str) -> None:
    prefix, bad = CASES[module]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")} | bad
    proc = subprocess.run(
        [sys.executable, "-m", module],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not started: invalid settings" in proc.stderr
    assert f"{prefix}NATS_USER: Field required" in proc.stderr
    (name,) = bad
    assert f"{name}" in proc.stderr


def test_nested_errors_name_the_variable_and_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("FEDGATE_TRAINER_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("FEDGATE_TRAINER_SECAGG", '{"digits": {"clip_norm": "secret-ish"}}')
    with pytest.raises(ConfigError) as info:
        settings_from_env(TrainerSettings)
    message = str(info.value)
    assert "FEDGATE_TRAINER_SECAGG (digits.clip_norm)" in message
    assert "secret-ish" not in message  # values are never echoed
