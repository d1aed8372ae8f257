"""The default model ``digits``: scikit-learn's 8x8 handwritten digits, 10 classes.

Input convention: ``pixels``, FP32, shape ``[batch, 64]``: the 8x8 image row-major, each
pixel an intensity in 0..16 (scikit-learn's scale) divided by 16, so values lie in [0, 1].
Output: ``logits``, FP32, shape ``[batch, 10]``; the predicted digit is the argmax.
The data set ships inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import torch

PIXELS = 64
CLASSES = 10
HIDDEN = 64


def build_digits_module() -> torch.nn.Module:
    """MLP 64-64-10 with ReLU."""
    from torch import nn

    return nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def preprocess_digits(raw: NDArray[Any]) -> NDArray[Any]:
    """Raw 0..16 pixel intensities, any shape ending in 64 or 8x8 -> FP32 [n, 64] in [0, 1]."""
    arr = np.asarray(raw, dtype=np.float32)
    return (arr.reshape(-1, PIXELS) / np.float32(16.0)).astype(np.float32)


def load_digits_dataset() -> tuple[NDArray[Any], NDArray[Any]]:
    """All 1797 digits as (X FP32 [n, 64] in [0, 1], y INT64 [n])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = preprocess_digits(bunch.data)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y


def train_test_split_digits(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """A fixed, stratified split: (x_train, y_train, x_test, y_test)."""
    x, y = load_digits_dataset()
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for c in range(CLASSES):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: round(len(idx) * test_fraction)].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    return x[~mask], y[~mask], x[mask], y[mask]


DIGITS = ModelSpec(
    name="digits",
    inputs=(TensorSpec("pixels", "FP32", (PIXELS,)),),
    outputs=(TensorSpec("logits", "FP32", (CLASSES,)),),
    module_factory=build_digits_module,
    preprocess=preprocess_digits,
    dataset=train_test_split_digits,
    input_convention=(
        "pixels: FP32 [batch, 64], the 8x8 image row-major, intensities 0..16 divided by 16"
    ),
    builtin=True,
)
