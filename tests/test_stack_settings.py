"""Configuring the local stack: ``fedgate.toml``, ``FEDGATE_*`` variables and ``--set``, in
that order of precedence; unknown keys refused with the closest real setting; ``fedgate
config show`` with sources and secrets masked; the CLI's exit codes; docs/settings.md
generated from the settings classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedgate.cli import _stack_config, build_parser, main
from fedgate.config_cmd import settings_markdown
from fedgate.stack_settings import collect

ROOT = Path(__file__).resolve().parent.parent


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedgate.toml"
    path.write_text(text)
    return path


def test_file_then_environment_then_set(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        '[trainer]\nmin_updates = 5\nstrategy = "fedavg"\nround_deadline_s = 30.0\n'
        "[gateway]\nrate_limit_per_s = 0\n[edge]\ncapture_rate = 0.5\n",
    )
    env = {"FEDGATE_TRAINER_STRATEGY": "median", "FEDGATE_TRAINER_ROUND_DEADLINE_S": "40"}
    settings = collect(toml, ["trainer.round_deadline_s=50"], environ=env)
    overrides = settings.env_overrides()
    assert overrides["FEDGATE_TRAINER_"] == {
        "MIN_UPDATES": "5",  # the file
        "STRATEGY": "median",  # the environment over the file
        "ROUND_DEADLINE_S": "50",  # --set over both
    }
    assert overrides["FEDGATE_GATEWAY_"] == {"RATE_LIMIT_PER_S": "0"}
    assert overrides["FEDGATE_EDGE_"] == {"CAPTURE_RATE": "0.5"}
    sources = {s.name: s.source for s in settings.effective("trainer")}
    assert sources["min_updates"] == "file"
    assert sources["strategy"] == "env FEDGATE_TRAINER_STRATEGY"
    assert sources["round_deadline_s"] == "--set"
    assert sources["gate_margin"] == "default"
    assert sources["nats_url"] == "stack"


def test_tables_become_json_for_the_service(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "[trainer.strategy_options]\neta = 1.5\nmomentum = 0.5\n")
    overrides = collect(toml, [], environ={}).env_overrides()
    assert json.loads(overrides["FEDGATE_TRAINER_"]["STRATEGY_OPTIONS"]) == {
        "eta": 1.5,
        "momentum": 0.5,
    }


@pytest.mark.parametrize(
    ("toml", "sets", "env", "message"),
    [
        ("[trainer]\nmin_update = 3\n", [], {}, "unknown setting 'min_update'; did you mean"),
        ("[trainr]\nmin_updates = 3\n", [], {}, "unknown service 'trainr'; did you mean trainer"),
        ("", ["edge.capture_rat=1"], {}, "did you mean capture_rate?"),
        ("", [], {"FEDGATE_EDGE_CAPTURE_RAT": "1"}, "did you mean FEDGATE_EDGE_CAPTURE_RATE?"),
        ("", [], {"FEDGATE_TRAINR_SEED": "1"}, "FEDGATE_TRAINR_SEED is not a fedgate setting"),
        ("", ["trainer.min_updates"], {}, "expected service.key=value"),
        ("", ["edge.capture_rate=2.5"], {}, "edge.capture_rate (--set): Input should be less"),
        ("", ["gateway.port=9000"], {}, "gateway.port is set by the stack itself"),
        ("[trainer\n", [], {}, "fedgate.toml: "),
    ],
)
def test_mistakes_are_errors_that_name_the_setting(
    tmp_path: Path, toml: str, sets: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        collect(write_toml(tmp_path, toml), sets, environ=env)
    assert message in str(info.value)


def test_up_passes_the_settings_to_its_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedgate up` dropped every FEDGATE_* variable: nothing could be configured."""
    monkeypatch.setenv("FEDGATE_GATEWAY_RATE_LIMIT_PER_S", "0")
    toml = write_toml(tmp_path, "[edge]\ncapture_rate = 0.25\n")
    args = build_parser().parse_args(
        ["up", "--config", str(toml), "--set", "trainer.min_updates=7"]
    )
    overrides = _stack_config(args).overrides
    assert overrides == {
        "FEDGATE_GATEWAY_": {"RATE_LIMIT_PER_S": "0"},
        "FEDGATE_TRAINER_": {"MIN_UPDATES": "7"},
        "FEDGATE_EDGE_": {"CAPTURE_RATE": "0.25"},
    }


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "fedgate.cli", *argv],
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_config_show_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, '[gateway]\napi_keys = "admin:ops:abc123"\n')
    proc = run_cli(
        "config", "show", "gateway", "--config", str(toml), "--set", "gateway.dev_mode=false"
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[3:] if line}
    assert lines["api_keys"] == ["****", "file"]
    assert "abc123" not in proc.stdout
    assert lines["dev_mode"] == ["false", "--set"]
    assert lines["port"][-1] == "stack"
    assert lines["rate_limit_per_s"] == ["1000.0", "default"]


@pytest.mark.parametrize(
    ("argv", "env", "code"),
    [
        (["--version"], {}, 0),
        (["config", "show", "--set", "trainer.min_update=1"], {}, 2),  # bad settings
        (["config", "show"], {"FEDGATE_TRAINER_MIN_UPDATE": "1"}, 2),
        (["up", "--log-level", "verbose"], {}, 2),  # bad usage
        (["rollout", "start", "digits", "2", "--stages", "10,x"], {}, 2),
        (["status", "--url", "http://127.0.0.1:9"], {}, 3),  # unreachable
        (["rollout", "status", "--url", "http://127.0.0.1:9"], {}, 3),
    ],
)
def test_exit_codes(argv: list[str], env: dict[str, str], code: int) -> None:
    proc = run_cli(*argv, env=env)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    assert run_cli("--version").stdout.strip() == f"fedgate {version('fedgate')}"


def test_settings_doc_is_current() -> None:
    """docs/settings.md is generated; regenerate with `fedgate config docs > docs/settings.md`."""
    assert (ROOT / "docs" / "settings.md").read_text() == settings_markdown().rstrip("\n") + "\n"


def test_every_setting_is_described() -> None:
    undocumented = [line for line in settings_markdown().splitlines() if line.endswith("|  |")]
    assert not undocumented, undocumented


def test_main_returns_2_for_a_config_error(tmp_path: Path) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "missing.toml")]) == 2
