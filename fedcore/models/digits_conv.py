"""The built-in image model ``digits_conv``: the 8x8 digits as rank-3 images, a small CNN.

Input convention: ``image``, FP32, shape ``[batch, 1, 8, 8]`` (channel, height, width),
pixel intensities 0..16 divided by 16 (as ``digits``). Output: ``logits``, FP32,
``[batch, 10]``; the predicted digit is the argmax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from fedcore.models.digits import CLASSES, train_test_split_digits
from fedcore.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import torch

CHANNELS = 8


def build_digits_conv_module() -> torch.nn.Module:
    """Conv 3x3 (8 channels) - ReLU - max-pool 2 - linear 128 -> 10."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, CHANNELS, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(CHANNELS * 4 * 4, CLASSES),
    )


def train_test_split_images(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """The digits split, each row as a [1, 8, 8] image."""
    x_tr, y_tr, x_te, y_te = train_test_split_digits(test_fraction, seed)
    return x_tr.reshape(-1, 1, 8, 8), y_tr, x_te.reshape(-1, 1, 8, 8), y_te


DIGITS_CONV = ModelSpec(
    name="digits_conv",
    inputs=(TensorSpec("image", "FP32", (1, 8, 8)),),
    outputs=(TensorSpec("logits", "FP32", (CLASSES,)),),
    module_factory=build_digits_conv_module,
    dataset=train_test_split_images,
    input_convention="image: FP32 [batch, 1, 8, 8], intensities 0..16 divided by 16",
    builtin=True,
)
