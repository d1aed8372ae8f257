"""Component configs take their defaults from the settings (issue #19, finding 3).

A component built without the settings (a test, a benchmark) must run with the values
production runs with. The learner's window budget was 60 s while the setting said 120 s,
and a round policy closed at 2 updates where the setting says 1: tests ran with other
values than production. Each config built from default settings equals the config's own
defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edge_runtime.idle import IdleThresholds
from edge_runtime.learner import LearnerConfig
from edge_runtime.learning import learner_config
from edge_runtime.settings import EdgeSettings
from edge_runtime.supervisor import SupervisionPolicy
from fedcore.errors import ConfigError
from fedcore.settings import setting_default
from gateway.fleet import Fleet
from gateway.settings import GatewaySettings
from trainer.books import policy_of
from trainer.ingest import IngestOptions
from trainer.rounds import RoundPolicy
from trainer.settings import TrainerSettings


def edge_settings(tmp_path: Path) -> EdgeSettings:
    files = {
        "seed_artifacts_dir": tmp_path,
        "trainer_public_key_file": tmp_path / "t.pub",
        "identity_key_file": tmp_path / "id.key",
        "trainer_hpke_public_key_file": tmp_path / "hpke.pub",
        "triton_control_secret_file": tmp_path / "control",
        "nats_password_file": tmp_path / "nats.pass",
    }
    return EdgeSettings(edge_id="edge-1", data_dir=tmp_path, **files)  # type: ignore[arg-type]


def trainer_settings(tmp_path: Path) -> TrainerSettings:
    return TrainerSettings(
        nats_user="trainer",
        nats_password_file=tmp_path / "p",
        data_dir=tmp_path,
        signing_key_file=tmp_path / "s",
        hpke_private_key_file=tmp_path / "h",
        edge_registry_file=tmp_path / "r",
    )


def test_the_learner_config_defaults_are_the_edge_settings_defaults(tmp_path: Path) -> None:
    built = learner_config(edge_settings(tmp_path), "digits")
    bare = LearnerConfig(
        edge_id=built.edge_id,
        model=built.model,
        work_dir=built.work_dir,
        sizes=built.sizes,
        recipe=built.recipe,
    )
    assert bare == built
    assert bare.window_budget_s == 120.0  # was 60 s in the learner, 120 s in the settings
    assert IdleThresholds() == built.thresholds


def test_the_round_policy_defaults_are_the_trainer_settings_defaults(tmp_path: Path) -> None:
    built = policy_of(trainer_settings(tmp_path))
    assert RoundPolicy() == built
    assert RoundPolicy().min_updates == 1  # was 2 in the policy, 1 in the settings


def test_the_ingest_limits_are_the_trainer_settings_defaults(tmp_path: Path) -> None:
    s = trainer_settings(tmp_path)
    options = IngestOptions()
    assert (options.max_update_bytes, options.ack_wait_s) == (
        s.max_update_bytes,
        s.updates_ack_wait_s,
    )


def test_the_supervision_policy_defaults_are_the_edge_settings_defaults(tmp_path: Path) -> None:
    s = edge_settings(tmp_path)
    assert SupervisionPolicy() == SupervisionPolicy(
        probe_interval_s=s.triton_probe_interval_s,
        probe_timeout_s=s.triton_probe_timeout_s,
        probe_failures=s.triton_probe_failures,
        restart_base_s=s.triton_restart_base_s,
        restart_max_s=s.triton_restart_max_s,
        ready_timeout_s=s.ready_timeout_s,
    )


def test_the_fleet_ejection_defaults_are_the_gateway_settings_defaults() -> None:
    fields: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Fleet)}
    settings = {
        "eject_after": "eject_after_failures",
        "eject_base_s": "eject_base_s",
        "eject_max_s": "eject_max_s",
    }
    for name, setting in settings.items():
        assert fields[name] == setting_default(GatewaySettings, setting), name


def test_a_required_setting_has_no_default_to_take() -> None:
    try:
        setting_default(TrainerSettings, "signing_key_file")
    except ConfigError as exc:
        assert "signing_key_file" in str(exc)
    else:
        raise AssertionError("a required setting gave a default")
