"""Evaluation gate: hand-made metrics in, release decision and reason out."""

from __future__ import annotations

import numpy as np

from fedcore.models import get_spec
from fedcore.params import flatten
from trainer.evaluate import Metrics, evaluate, gate, weighted_edge_metric


def test_gate_holds_back_a_worse_candidate_with_the_reason() -> None:
    serving = Metrics("accuracy", 0.90, 0.3, 450)
    assert gate(Metrics("accuracy", 0.91, 0.3, 450), serving, margin=0.01).release
    assert gate(Metrics("accuracy", 0.895, 0.3, 450), serving, margin=0.01).release  # within margin
    held = gate(Metrics("accuracy", 0.85, 0.5, 450), serving, margin=0.01)
    assert not held.release
    assert "0.8500 is 0.0500 below serving 0.9000" in held.reason


def test_gate_uses_edge_reports_as_a_second_opinion() -> None:
    serving = Metrics("accuracy", 0.90, 0.3, 450)
    held = gate(
        Metrics("accuracy", 0.92, 0.3, 450),
        serving,
        margin=0.02,
        edge_value=0.70,
        serving_edge_value=0.80,
    )
    assert not held.release and "edge-reported accuracy 0.7000" in held.reason


def test_weighted_edge_metric_by_hand() -> None:
    assert weighted_edge_metric({"a": (0.5, 10), "b": (1.0, 30)}) == 0.875
    assert weighted_edge_metric({}) is None


def test_evaluate_matches_a_hand_check() -> None:
    spec = get_spec("digits")
    module = spec.build_module()
    params = flatten(module)
    _, _, x, y = spec.dataset()
    m = evaluate(spec, params, x[:50], y[:50])
    import torch

    with torch.no_grad():
        pred = module(torch.from_numpy(x[:50])).argmax(1).numpy()
    assert m.metric == "accuracy"
    assert m.value == float(np.mean(pred == y[:50]))
    assert m.samples == 50 and m.loss > 0


def test_gate_on_mae_holds_a_higher_error_and_releases_a_lower_one() -> None:
    serving = Metrics("mae", 40.0, 2500.0, 100)
    assert gate(Metrics("mae", 38.0, 2400.0, 100), serving, margin=0.5).release
    assert gate(Metrics("mae", 40.4, 2400.0, 100), serving, margin=0.5).release  # in margin
    held = gate(Metrics("mae", 42.0, 2600.0, 100), serving, margin=0.5)
    assert not held.release
    assert "held-out mae 42.0000 is 2.0000 above serving 40.0000" in held.reason
    assert "lower is better" in held.reason


def test_evaluate_regression_matches_a_hand_mae() -> None:
    import torch

    from fedcore.spec import ModelSpec, TensorSpec
    from fedcore.task import LabelKind, Loss, Task

    spec = ModelSpec(
        name="lin",
        inputs=(TensorSpec("x", "FP32", (3,)),),
        outputs=(TensorSpec("y", "FP32", (1,)),),
        module_factory=lambda: torch.nn.Linear(3, 1),
        task=Task(loss=Loss.MSE, label=LabelKind.FLOAT, metric="mae"),
    )
    module = spec.build_module()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.normal(size=(40, 1)).astype(np.float32)
    m = evaluate(spec, flatten(module), x, y)
    with torch.no_grad():
        pred = module(torch.from_numpy(x)).numpy()
    assert m.metric == "mae" and m.spec.higher_is_better is False
    assert abs(m.value - float(np.mean(np.abs(pred - y)))) < 1e-6
    assert abs(m.loss - float(np.mean((pred - y) ** 2))) < 1e-5
