"""Evaluation gate: hand-made metrics in, release decision and reason out."""

from __future__ import annotations

import numpy as np

from fedcore.models import get_spec
from fedcore.params import flatten
from trainer.evaluate import Metrics, evaluate, gate, weighted_edge_accuracy


def test_gate_holds_back_a_worse_candidate_with_the_reason() -> None:
    serving = Metrics(0.90, 0.3, 450)
    assert gate(Metrics(0.91, 0.3, 450), serving, margin=0.01).release
    assert gate(Metrics(0.895, 0.3, 450), serving, margin=0.01).release  # within margin
    held = gate(Metrics(0.85, 0.5, 450), serving, margin=0.01)
    assert not held.release
    assert "0.8500 is 0.0500 below serving 0.9000" in held.reason


def test_gate_uses_edge_reports_as_a_second_opinion() -> None:
    serving = Metrics(0.90, 0.3, 450)
    held = gate(
        Metrics(0.92, 0.3, 450),
        serving,
        margin=0.02,
        edge_accuracy=0.70,
        serving_edge_accuracy=0.80,
    )
    assert not held.release and "edge-reported accuracy 0.7000" in held.reason


def test_weighted_edge_accuracy_by_hand() -> None:
    assert weighted_edge_accuracy({"a": (0.5, 10), "b": (1.0, 30)}) == 0.875
    assert weighted_edge_accuracy({}) is None


def test_evaluate_matches_a_hand_check() -> None:
    spec = get_spec("digits")
    module = spec.build_module()
    params = flatten(module)
    _, _, x, y = spec.dataset()
    m = evaluate(spec, params, x[:50], y[:50])
    import torch

    with torch.no_grad():
        pred = module(torch.from_numpy(x[:50])).argmax(1).numpy()
    assert m.accuracy == float(np.mean(pred == y[:50]))
    assert m.samples == 50 and m.loss > 0
