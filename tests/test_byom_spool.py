"""The spool of a model with several inputs and non-class labels, written by the capture
code exactly as model.py holds it: rows decode into inputs by name, labels by the task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.spool import JoinResult, Spool, spool_path
from fedcore.spec import ModelSpec, TensorSpec
from fedcore.task import LabelKind, Loss, Task
from fedcore.triton_model import render_model_py
from tests.test_edge_spool import capture_module

SPEC = ModelSpec(
    name="twoin",
    inputs=(TensorSpec("dense", "FP32", (3,)), TensorSpec("count", "INT32", (2,))),
    outputs=(TensorSpec("score", "FP32", (1,)), TensorSpec("embedding", "FP32", (-1,))),
    module_factory=torch.nn.Identity,
    task=Task(
        loss=Loss.MSE,
        label=LabelKind.FLOAT,
        metric="mae",
        output="score",
        capture_outputs=("score",),
    ),
)


def test_model_py_captures_only_the_tensors_the_task_names() -> None:
    source = render_model_py(SPEC)
    assert "CAPTURED_INPUTS = ['dense', 'count']" in source
    assert "CAPTURED_OUTPUTS = ['score']" in source


def test_multi_input_rows_and_float_labels_decode(tmp_path: Path) -> None:
    path = spool_path(tmp_path, SPEC.name)
    Spool(path).close()
    writer: Any = capture_module()["CaptureWriter"](str(path), 1.0, 100, 1000, version=1)
    for i in range(4):
        dense = np.full((1, 3), i + 0.5, dtype=np.float32)
        count = np.array([[i, -i]], dtype=np.int32)
        writer.offer(f"r{i}", [dense, count], [np.array([[float(i)]], dtype=np.float32)])
    writer.close()
    spool = Spool(path)
    try:
        assert spool.join_label("r1", 2.5) is JoinResult.JOINED
        assert spool.join_label("r2", 3.0) is JoinResult.JOINED  # stays a float
        assert spool.join_label("r3", 7, weight=2.0) is JoinResult.JOINED
        data = spool.labelled(SPEC, holdout_fraction=0.0)
    finally:
        spool.close()
    assert set(data.x_train) == {"dense", "count"}
    order = np.argsort(data.x_train["dense"][:, 0])
    np.testing.assert_array_equal(data.x_train["dense"][order, 0], [1.5, 2.5, 3.5])
    np.testing.assert_array_equal(data.x_train["count"][order], [[1, -1], [2, -2], [3, -3]])
    assert data.x_train["count"].dtype == np.int32
    assert data.y_train.dtype == np.float32 and data.y_train.shape == (3, 1)
    np.testing.assert_array_equal(data.y_train[order, 0], [2.5, 3.0, 7.0])
    np.testing.assert_array_equal(data.w_train[order], [1.0, 1.0, 2.0])
