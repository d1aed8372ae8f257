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
    # an edge's NATS user defaults to its id, which it may derive (FEDGATE_EDGE_NODE_NAME)
    required = "EDGE_ID: Value error, no edge id" if module == "edge_runtime" else "NATS_USER"
    assert f"{prefix}{required}" in proc.stderr
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


def test_an_unknown_variable_is_refused_with_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic-settings ignores unknown prefixed variables: a typo silently kept the default."""
    for k in [k for k in os.environ if k.startswith("FEDGATE_TRAINER_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("FEDGATE_TRAINER_MIN_UPDATE", "3")
    with pytest.raises(ConfigError) as info:
        settings_from_env(TrainerSettings)
    message = str(info.value)
    assert (
        "FEDGATE_TRAINER_MIN_UPDATE: not a setting of this service; "
        "did you mean FEDGATE_TRAINER_MIN_UPDATES?" in message
    )
    assert "FEDGATE_TRAINER_NATS_USER: Field required" in message  # reported together


def test_a_bad_log_level_is_a_setting_error_and_any_case_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LOG_LEVEL=verbose crashed the service with a traceback from logging."""
    for k in [k for k in os.environ if k.startswith("FEDGATE_TRAINER_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("FEDGATE_TRAINER_LOG_LEVEL", "verbose")
    with pytest.raises(ConfigError) as info:
        settings_from_env(TrainerSettings)
    assert "FEDGATE_TRAINER_LOG_LEVEL: Input should be 'DEBUG', 'INFO'" in str(info.value)
    monkeypatch.setenv("FEDGATE_TRAINER_LOG_LEVEL", "debug")
    with pytest.raises(ConfigError) as info:
        settings_from_env(TrainerSettings)  # still missing required ones, but not the level
    assert "LOG_LEVEL" not in str(info.value)
