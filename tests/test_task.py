"""The task part of a model spec: labels, their spool form, per-sample metrics, losses,
and the spec's checks of tensors, task and recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.spec import ModelSpec, TensorSpec, TrainingRecipe
from fedcore.task import (
    LabelKind,
    Loss,
    Task,
    check_label,
    decode_labels,
    encode_label,
    metric_value,
    sample_scores,
    torch_loss,
)

REGRESSION = Task(loss=Loss.MSE, label=LabelKind.FLOAT, metric="mae")
VECTOR = Task(loss=Loss.L1, label=LabelKind.VECTOR, metric="mse")
MULTI_HOT = Task(loss=Loss.BCE_WITH_LOGITS, label=LabelKind.MULTI_HOT, metric="hamming_accuracy")


def test_digits_keeps_its_classifier_defaults() -> None:
    spec = get_spec("digits")
    assert spec.task == Task()
    assert (spec.task.loss, spec.task.label, spec.task.metric) == (
        Loss.CROSS_ENTROPY,
        LabelKind.CLASS,
        "accuracy",
    )
    assert spec.task.metric_spec.higher_is_better
    assert spec.recipe == TrainingRecipe(optimizer="sgd", lr=0.05, momentum=0.9, epochs=1)
    assert spec.target.name == "logits" and spec.trainable and spec.builtin


@pytest.mark.parametrize(
    ("task", "width", "value", "expected"),
    [
        (Task(), 10, 3, 3),
        (REGRESSION, 1, 151.5, 151.5),
        (REGRESSION, 1, 7, 7.0),
        (VECTOR, 3, [1, 2.5, -3], [1.0, 2.5, -3.0]),
        (MULTI_HOT, 3, [0, 1, 1], [0.0, 1.0, 1.0]),
    ],
)
def test_labels_of_each_kind_are_accepted(
    task: Task, width: int, value: object, expected: object
) -> None:
    assert check_label(task, width, value) == expected


@pytest.mark.parametrize(
    ("task", "width", "value", "message"),
    [
        (Task(), 10, 10, "10 is not a class of this model (0..9)"),
        (Task(), 10, -1, "-1 is not a class"),
        (Task(), 10, 2.5, "must be an integer class index"),
        (Task(), 10, True, "must be an integer class index"),
        (REGRESSION, 1, "3", "must be a number"),
        (REGRESSION, 1, [1.0], "must be a number"),
        (REGRESSION, 1, float("nan"), "must be finite"),
        (VECTOR, 3, [1.0, 2.0], "must have 3 values, got 2"),
        (VECTOR, 3, 1.0, "must be a list of 3 numbers"),
        (MULTI_HOT, 2, [0, 0.5], "multi-hot values must each be 0 or 1"),
    ],
)
def test_bad_labels_are_refused_with_a_reason(
    task: Task, width: int, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_label(task, width, value)


def test_labels_round_trip_through_their_spool_form() -> None:
    assert encode_label(4) == 4
    assert encode_label(3.0) == "[3.0]"  # text: SQLite's integer affinity cannot round it
    np.testing.assert_array_equal(decode_labels(Task(), [4, 7], 10), np.array([4, 7]))
    y = decode_labels(REGRESSION, [encode_label(2.5), 3], 1)
    assert y.dtype == np.float32 and y.tolist() == [[2.5], [3.0]]
    v = decode_labels(VECTOR, [encode_label([1.0, 2.0, 3.0])], 3)
    assert v.tolist() == [[1.0, 2.0, 3.0]]


def test_per_sample_metrics_by_hand() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    np.testing.assert_array_equal(sample_scores(Task(), logits, np.array([1, 1, 1])), [1, 0, 1])
    pred, y = np.array([[1.0], [4.0]]), np.array([[2.0], [1.0]])
    np.testing.assert_allclose(sample_scores(REGRESSION, pred, y), [1.0, 3.0])
    assert metric_value(REGRESSION, pred, y) == 2.0
    np.testing.assert_allclose(
        sample_scores(VECTOR, np.array([[1.0, 3.0]]), np.array([[0.0, 1.0]])), [2.5]
    )
    hot = sample_scores(MULTI_HOT, np.array([[2.0, -1.0, 0.5]]), np.array([[1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(hot, [2 / 3])
    assert metric_value(REGRESSION, np.zeros((0, 1)), np.zeros((0, 1))) is None


def test_losses_per_sample_match_torch() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ce = torch_loss(Task(), logits, torch.tensor([0, 0]))
    assert ce.shape == (2,)
    assert torch.allclose(
        ce, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    )
    mse = torch_loss(REGRESSION, torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]))
    assert mse.tolist() == [1.0, 4.0]
    l1 = torch_loss(VECTOR, torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]]))
    assert l1.tolist() == [2.0]


def test_a_task_refuses_a_metric_or_loss_that_does_not_fit_its_labels() -> None:
    with pytest.raises(ModelSpecError, match=r"task.metric: unknown metric 'f1'"):
        Task(metric="f1")
    with pytest.raises(ModelSpecError, match=r"task.metric: 'accuracy' does not apply to float"):
        Task(loss=Loss.MSE, label=LabelKind.FLOAT, metric="accuracy")
    with pytest.raises(ModelSpecError, match=r"task.loss: 'mse' does not apply to class"):
        Task(loss=Loss.MSE)


def _spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = {
        "name": "m",
        "inputs": (TensorSpec("a", "FP32", (4,)), TensorSpec("b", "INT64", (2,))),
        "outputs": (TensorSpec("out", "FP32", (3,)), TensorSpec("aux", "FP32", (-1,))),
        "module_factory": torch.nn.Identity,
        "task": Task(output="out", capture_outputs=("out",)),
    }
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def test_spec_takes_several_inputs_outputs_and_variable_dims() -> None:
    spec = _spec()
    assert spec.input_names == ["a", "b"] and spec.target.name == "out"
    assert [t.name for t in spec.captured_outputs] == ["out"]
    assert spec.trainable
    assert TensorSpec("x", "UINT16", (-1, 3)).fixed is False
    feeds = spec.feeds({"a": np.zeros((2, 4)), "b": np.zeros((2, 2))})
    assert feeds["b"].dtype == np.int64


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"inputs": (TensorSpec("a", "FP32", (4,)), TensorSpec("a", "FP32", (1,)))},
            "duplicate tensor names ['a']",
        ),
        ({"task": Task(output="nope")}, "task.output names no output: 'nope'"),
        (
            {"task": Task(output="out", capture_inputs=("zz",))},
            "task.capture_inputs names no tensor",
        ),
        ({"task": Task(output="out")}, "tensor 'aux' has a variable dim"),
        ({"task": Task(output="aux", capture_outputs=())}, "task.output 'aux' needs a fixed shape"),
    ],
)
def test_spec_refuses_inconsistent_tasks(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ModelSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _spec(**kw)


@pytest.mark.parametrize("datatype", ["BF16", "BYTES", "FLOAT"])
def test_unsupported_datatypes_are_named(datatype: str) -> None:
    with pytest.raises(ModelSpecError, match=f"unsupported datatype '{datatype}'"):
        TensorSpec("x", datatype, (1,))


def test_recipe_refuses_nonsense() -> None:
    with pytest.raises(ModelSpecError, match=r"recipe\.optimizer"):
        TrainingRecipe(optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ModelSpecError, match="lr must be > 0"):
        TrainingRecipe(lr=0)
