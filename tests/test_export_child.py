"""The release's ONNX export and checks run in a short-lived forked child
(:mod:`trainer.export_child`): the file it leaves is a checked model, its refusals reach
the trainer as before (``ModelSpecError``: the candidate is held), other failures as a
``TrainerError``."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.params import flatten
from fedcore.triton_model import ONNX_FILE, WEIGHTS_FILE
from fedcore.weights import dummy_batch
from trainer.errors import TrainerError
from trainer.export_child import export_in_child


def batch(spec: object) -> object:
    return dummy_batch(get_spec("digits"), rows=4)


def test_the_child_writes_an_onnx_that_matches_the_parameters(tmp_path: Path) -> None:
    spec = get_spec("digits")
    params = flatten(spec.build_module())
    np.save(tmp_path / WEIGHTS_FILE, params, allow_pickle=False)
    child_mb = export_in_child(spec, tmp_path, batch)
    assert child_mb > 0
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert children_kib * 1024 / 1e6 >= child_mb * 0.99  # it ran in another process
    session = ort.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == spec.output_names


def test_a_refusal_in_the_child_is_a_model_spec_error(tmp_path: Path) -> None:
    spec = get_spec("digits")
    np.save(tmp_path / WEIGHTS_FILE, np.zeros(7, np.float32), allow_pickle=False)
    with pytest.raises(ModelSpecError, match="parameter vector has 7 values"):
        export_in_child(spec, tmp_path, batch)


def test_another_failure_in_the_child_is_a_trainer_error(tmp_path: Path) -> None:
    with pytest.raises(TrainerError) as err:
        export_in_child(get_spec("digits"), tmp_path, batch)  # no weights.npy
    assert err.value.reason == "export-child"
    assert "weights.npy" in str(err.value)


def test_the_child_refuses_an_export_that_refers_to_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The external-data check runs in the child (the trainer's verification of its own
    signed version leaves it out: a second parse of the ONNX file is the model's size)."""
    import onnx

    import fedcore.onnx_export
    from tests.test_hostile_artifacts import external

    real = fedcore.onnx_export.check_onnx_matches_torch

    def check_then_point_outside(spec: Any, module: Any, path: Path, feeds: Any) -> None:
        real(spec, module, path, feeds)
        model = onnx.load(str(path))
        external(model.graph.initializer[0], "../../etc/passwd")
        onnx.save(model, str(path))

    monkeypatch.setattr(fedcore.onnx_export, "check_onnx_matches_torch", check_then_point_outside)
    spec = get_spec("digits")
    np.save(tmp_path / WEIGHTS_FILE, flatten(spec.build_module()), allow_pickle=False)
    with pytest.raises(ModelSpecError, match="external data"):
        export_in_child(spec, tmp_path, batch)


def test_verify_leaves_the_onnx_parse_out_only_when_asked(tmp_path: Path) -> None:
    import onnx
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fedcore.artifact import sign_version_dir, verify_version_dir
    from fedcore.errors import ArtifactError
    from tests.test_hostile_artifacts import external

    spec = get_spec("digits")
    np.save(tmp_path / WEIGHTS_FILE, flatten(spec.build_module()), allow_pickle=False)
    export_in_child(spec, tmp_path, batch)
    model = onnx.load(str(tmp_path / ONNX_FILE))
    external(model.graph.initializer[0], "/proc/self/environ")
    onnx.save(model, str(tmp_path / ONNX_FILE))
    key = ed25519.Ed25519PrivateKey.generate()
    sign_version_dir(tmp_path, key, model="digits", version=2)
    verify_version_dir(tmp_path, key.public_key(), check_onnx=False)
    with pytest.raises(ArtifactError) as err:
        verify_version_dir(tmp_path, key.public_key())
    assert err.value.reason == "external-data"
