"""The model spec and everything derived from it, checked without servers."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.models.digits import load_digits_dataset, preprocess_digits
from fedcore.onnx_export import check_onnx_matches_torch, export_onnx
from fedcore.params import flatten, layout, load_flat
from fedcore.spec import TensorSpec
from fedcore.triton_config import render_config
from fedcore.triton_model import render_model_py


def test_rendered_config_says_what_the_spec_says() -> None:
    spec = get_spec("digits")
    text = render_config(spec, "KIND_GPU", instances=2)
    assert 'name: "digits"' in text
    assert 'backend: "python"' in text
    assert "max_batch_size: 64" in text
    assert "version_policy: { latest: { num_versions: 2 } }" in text
    assert '{ name: "pixels" data_type: TYPE_FP32 dims: [ 64 ] }' in text
    assert '{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }' in text
    assert "instance_group [ { kind: KIND_GPU count: 2 } ]" in text
    assert "preferred_batch_size: [ 8, 32 ]" in text
    assert "max_queue_delay_microseconds: 200" in text


def test_onnx_export_checks_and_matches_torch(tmp_path: Path) -> None:
    spec = get_spec("digits")
    module = spec.build_module()
    path = tmp_path / "model.onnx"
    export_onnx(spec, module, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch axis
    x, _ = load_digits_dataset()
    for n in (1, 7, 64):
        assert check_onnx_matches_torch(spec, module, path, x[:n]) <= 1e-5


def test_onnx_mismatch_is_detected(tmp_path: Path) -> None:
    spec = get_spec("digits")
    module = spec.build_module()
    path = tmp_path / "model.onnx"
    export_onnx(spec, module, path)
    other = spec.build_module()  # different random weights
    x, _ = load_digits_dataset()
    with pytest.raises(ModelSpecError, match="differs from torch"):
        check_onnx_matches_torch(spec, other, path, x[:8])


def test_model_py_is_valid_python_with_spec_names() -> None:
    source = render_model_py(get_spec("digits"))
    ast.parse(source)
    assert "INPUTS = [('pixels', '<f4')]" in source
    assert "OUTPUTS = [('logits', '<f4')]" in source
    assert "CUDAExecutionProvider" in source


def test_flat_parameters_round_trip() -> None:
    spec = get_spec("digits")
    module = spec.build_module()
    vec = flatten(module)
    assert vec.dtype == np.float32
    assert (
        vec.size == sum(int(np.prod(s)) for _, s in layout(module)) == 64 * 64 + 64 + 64 * 10 + 10
    )
    other = spec.build_module()
    load_flat(other, vec)
    x = torch.rand(3, 64)
    assert torch.equal(module(x), other(x))
    with pytest.raises(ModelSpecError, match="parameter vector has 3 values"):
        load_flat(other, np.zeros(3, dtype=np.float32))


def test_preprocess_scales_pixels_to_unit_range() -> None:
    raw = np.full((2, 8, 8), 16.0)
    out = preprocess_digits(raw)
    assert out.shape == (2, 64) and out.dtype == np.float32
    assert np.all(out == 1.0)


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "message"),
    [
        ("bad name", "FP32", (1,), "must be an identifier"),
        ('x" } ]', "FP32", (1,), "must be an identifier"),
        ("x", "COMPLEX", (1,), "unsupported datatype"),
        ("x", "FP32", (0,), "dims must be positive"),
    ],
)
def test_tensor_spec_validation(
    name: str, datatype: str, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ModelSpecError, match=message):
        TensorSpec(name, datatype, shape)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(
        ModelSpecError,
        # the built-ins, and any model an earlier test resolved (the example package)
        match=r"unknown model 'cats'; known: \['diabetes', 'digits', 'digits_conv', .*'wide'\]",
    ):
        get_spec("cats")


def test_the_wide_model_has_the_width_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcore.models.wide import hidden_for, parameter_count, wide_spec

    monkeypatch.setenv("FEDGATE_WIDE_HIDDEN", "30")
    module = get_spec("wide").build_module()
    assert sum(p.numel() for p in module.parameters()) == parameter_count(30) == 3190
    assert parameter_count(5000) == 25_380_010  # the default: 102 MB in FP32
    assert parameter_count(hidden_for(25_000_000)) >= 25_000_000
    assert parameter_count(hidden_for(25_000_000) - 1) < 25_000_000
    assert wide_spec(7).build_module()[2].weight.shape == (7, 7)
