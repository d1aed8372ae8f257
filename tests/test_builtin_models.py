"""The built-in models: each passes the deep spec checks, bootstraps, and exports to an
ONNX file whose outputs equal torch's; the regression model's bootstrap is modest on MAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcore.artifact import verify_version_dir
from fedcore.keys import generate_ed25519
from fedcore.models import BUILTINS, get_spec
from fedcore.models.wide import HIDDEN_VAR
from fedcore.spec_check import check_spec
from trainer.bootstrap import train_seed_model, write_version
from trainer.evaluate import evaluate


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_bootstraps_and_exports(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HIDDEN_VAR, "32")  # wide at a test's size (25M parameters by default)
    spec = get_spec(name)
    check_spec(spec)
    params = train_seed_model(spec, fraction=0.1, epochs=2, seed=0)
    key = generate_ed25519(tmp_path / "k.key")
    directory = tmp_path / name / "1"
    write_version(spec, params, directory, key, version=1)  # checks ONNX against torch
    verify_version_dir(directory, key.public_key(), model=name, version=1)


def test_image_model_takes_rank_3_images() -> None:
    spec = get_spec("digits_conv")
    assert spec.inputs[0].shape == (1, 8, 8)
    x_train, _, _, _ = spec.dataset()  # type: ignore[misc]
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == np.float32


def test_diabetes_is_a_regression_gated_on_mae() -> None:
    spec = get_spec("diabetes")
    assert (spec.inputs[0].datatype, spec.inputs[0].shape) == ("FP32", (10,))
    assert (spec.outputs[0].datatype, spec.outputs[0].shape) == ("FP32", (1,))
    assert spec.task.loss.value == "mse" and spec.task.metric == "mae"
    _, y_train, x_test, y_test = spec.dataset()  # type: ignore[misc]
    assert len(y_train) + len(y_test) == 442
    seed = evaluate(spec, train_seed_model(spec, 0.1, 8, 0), x_test, y_test)
    full = evaluate(spec, train_seed_model(spec, 1.0, 60, 0), x_test, y_test)
    assert seed.metric == "mae"
    assert full.value < seed.value - 5, (seed, full)  # room for the edges to improve on v1
