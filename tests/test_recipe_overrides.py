"""One training recipe (fedcore.spec.TrainingRecipe): settings only override its fields,
and an override set through the environment reaches what trains: the edge's worker, and
the trainer's round announcements and version-1 bootstrap."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edge_runtime.finetune import Control, JobSpec, run_job
from edge_runtime.learning import learner_config
from edge_runtime.settings import EdgeSettings
from edge_runtime.worker_reports import Finished, Started, WorkerReport
from fedcore.errors import ModelSpecError
from fedcore.keys import generate_ed25519
from fedcore.models import get_spec
from fedcore.spec import TrainingRecipe
from tests.conftest import SignedArtifacts
from tests.test_edge_finetune import job
from tests.test_edge_identity import required
from trainer import service
from trainer.books import policy_of
from trainer.bootstrap import train_seed_model
from trainer.settings import TrainerSettings


def _clean_env(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    for name in [k for k in os.environ if k.startswith(prefix)]:
        monkeypatch.delenv(name)


def test_overridden_replaces_only_given_fields_and_checks_them() -> None:
    base = get_spec("digits").recipe
    assert base.overridden() is base
    assert base.overridden(lr=None, epochs=None) is base
    assert base.overridden(batch_size=8) == dataclasses.replace(base, batch_size=8)
    with pytest.raises(ModelSpecError, match="no field batchsize"):
        base.overridden(batchsize=8)
    with pytest.raises(ModelSpecError, match="epochs"):
        base.overridden(epochs=0)


def test_an_edge_env_override_reaches_the_worker(
    tmp_path: Path, signed_v1: SignedArtifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch, "FEDGATE_EDGE_")
    monkeypatch.setenv("FEDGATE_EDGE_TRAIN_BATCH_SIZE", "8")
    settings = EdgeSettings(edge_id="edge-1", **required(tmp_path))  # type: ignore[arg-type]
    recipe = learner_config(settings, "digits").recipe
    spec = get_spec("digits")
    assert recipe == spec.recipe.overridden(batch_size=8)  # the rest is the spec's
    job_spec = job(tmp_path, signed_v1, **dataclasses.asdict(recipe))
    # what the worker reads back from the job file it is given
    assert JobSpec.model_validate_json(job_spec.model_dump_json()).recipe == recipe
    reports: list[WorkerReport] = []
    run_job(job_spec, Control.create(job_spec.control), reports.append)
    started, finished = reports[0], reports[-1]
    assert isinstance(started, Started) and isinstance(finished, Finished), reports
    assert finished.batch == math.ceil(started.samples / 8) * recipe.epochs


def test_the_worker_refuses_a_job_with_an_unknown_recipe_field(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    doc = job(tmp_path, signed_v1).model_dump(mode="json")
    doc["recipe"]["batchsize"] = 8
    with pytest.raises(ValidationError, match="batchsize"):
        JobSpec.model_validate(doc)


def _trainer_settings(tmp_path: Path) -> TrainerSettings:
    generate_ed25519(tmp_path / "signing.key")
    return TrainerSettings(
        nats_user="trainer",
        nats_password_file=tmp_path / "p",
        data_dir=tmp_path,
        signing_key_file=tmp_path / "signing.key",
        hpke_private_key_file=tmp_path / "h",
        edge_registry_file=tmp_path / "r",
    )


def test_a_trainer_env_override_reaches_the_announcement_and_the_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch, "FEDGATE_TRAINER_")
    monkeypatch.setenv("FEDGATE_TRAINER_LOCAL_BATCH_SIZE", "8")
    settings = _trainer_settings(tmp_path)
    assert policy_of(settings).recipe.batch_size == 8  # told to the edges in every round
    seen: list[TrainingRecipe | None] = []

    def ensure(*_: Any, recipe: TrainingRecipe | None = None, **__: Any) -> Path:
        seen.append(recipe)
        return tmp_path

    monkeypatch.setattr(service, "ensure_version_one", ensure)
    service.bootstrap(settings)
    assert seen == [get_spec("digits").recipe.overridden(batch_size=8)]


def test_the_bootstrap_trains_with_the_recipe_it_is_given() -> None:
    spec = get_spec("digits")
    default = train_seed_model(spec, 0.05, 1, 0)
    assert np.array_equal(default, train_seed_model(spec, 0.05, 1, 0, spec.recipe))
    small = train_seed_model(spec, 0.05, 1, 0, spec.recipe.overridden(batch_size=8))
    assert not np.array_equal(default, small)
