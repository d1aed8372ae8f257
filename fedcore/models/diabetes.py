"""The built-in regression model ``diabetes``: scikit-learn's diabetes data, 10 -> 1.

Input convention: ``features``, FP32, shape ``[batch, 10]``: scikit-learn's diabetes
features as ``load_diabetes()`` gives them (each column centred and scaled to unit L2
norm over the 442 patients), multiplied by ``sqrt(442)`` so each has unit variance.
Output: ``progression``, FP32, shape ``[batch, 1]``: the predicted disease progression one
year after baseline (the data set's target, 25..346). Trained with MSE, gated on MAE
(lower is better). The data ships inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.spec import ModelSpec, TensorSpec, TrainingRecipe
from fedcore.task import LabelKind, Loss, Task

if TYPE_CHECKING:
    import torch

FEATURES = 10
HIDDEN = 32
SAMPLES = 442
TARGET_MEAN = 152.0  # the data set's target mean and spread: the net learns in these units
TARGET_SCALE = 77.0


def build_diabetes_module() -> torch.nn.Module:
    """MLP 10-32-1 whose output is rescaled to the target's units (constants, not weights)."""
    from torch import nn

    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x) * TARGET_SCALE + TARGET_MEAN
            return out

    return Regressor()


def load_diabetes_dataset() -> tuple[NDArray[Any], NDArray[Any]]:
    """All 442 patients as (X FP32 [n, 10] unit variance, y FP32 [n, 1])."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = (np.asarray(bunch.data) * np.sqrt(SAMPLES)).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.float32).reshape(-1, 1)
    return x, y


def train_test_split_diabetes(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """A fixed random split: (x_train, y_train, x_test, y_test)."""
    x, y = load_diabetes_dataset()
    order = np.random.default_rng(seed).permutation(len(y))
    cut = round(len(y) * test_fraction)
    test, train = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


DIABETES = ModelSpec(
    name="diabetes",
    inputs=(TensorSpec("features", "FP32", (FEATURES,)),),
    outputs=(TensorSpec("progression", "FP32", (1,)),),
    module_factory=build_diabetes_module,
    task=Task(loss=Loss.MSE, label=LabelKind.FLOAT, metric="mae"),
    # Adam: its step does not grow with the squared-error scale of the target's units
    recipe=TrainingRecipe(optimizer="adam", lr=0.003, momentum=0.0, epochs=5, batch_size=16),
    dataset=train_test_split_diabetes,
    input_convention=(
        "features: FP32 [batch, 10], scikit-learn's diabetes features times sqrt(442)"
    ),
    builtin=True,
    bootstrap_lr=0.003,
)
