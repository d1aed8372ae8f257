"""The model ``wide``: the digits task with a configurable-size MLP, for models of real size.

Same input and output as ``digits`` (``pixels`` FP32 ``[batch, 64]`` in [0, 1] ->
``logits`` FP32 ``[batch, 10]``) and the same data set, but the hidden layers are
``hidden`` wide: 64 -> hidden -> hidden -> 10, about ``hidden**2`` parameters. The width
is the setting ``FEDGATE_WIDE_HIDDEN`` (read when the module is built, so the trainer and
every edge of a deployment must share it); the default, 5000, gives 25.4 million
parameters, 102 MB in FP32. :func:`wide_spec` builds a spec of a fixed width.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedcore.models.digits import CLASSES, PIXELS, preprocess_digits, train_test_split_digits
from fedcore.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import torch

DEFAULT_HIDDEN = 5000
HIDDEN_VAR = "FEDGATE_WIDE_HIDDEN"


class WideSettings(BaseSettings):
    """The width of the ``wide`` model (env ``FEDGATE_WIDE_HIDDEN``)."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_WIDE_", extra="ignore", frozen=True)

    hidden: int = Field(
        default=DEFAULT_HIDDEN, ge=1, le=65536, description="width of both hidden layers"
    )


def parameter_count(hidden: int) -> int:
    """Parameters of the wide MLP of width ``hidden`` (weights and biases)."""
    return PIXELS * hidden + hidden + hidden * hidden + hidden + hidden * CLASSES + CLASSES


def hidden_for(parameters: int) -> int:
    """The smallest width whose MLP has at least ``parameters`` parameters."""
    linear = PIXELS + 2 + CLASSES  # parameter_count(h) = h*h + linear*h + CLASSES
    hidden = max(1, math.ceil((-linear + math.sqrt(linear**2 + 4 * parameters)) / 2))
    while parameter_count(hidden) < parameters:
        hidden += 1
    while hidden > 1 and parameter_count(hidden - 1) >= parameters:
        hidden -= 1
    return hidden


def build_wide_module(hidden: int | None = None) -> torch.nn.Module:
    """MLP 64-hidden-hidden-10 with ReLU; ``hidden`` defaults to the setting."""
    from torch import nn

    width = hidden if hidden is not None else WideSettings().hidden
    return nn.Sequential(
        nn.Linear(PIXELS, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, CLASSES),
    )


def wide_spec(hidden: int | None = None, name: str = "wide") -> ModelSpec:
    """The spec of a wide MLP of width ``hidden`` (``None``: the setting, read at build)."""
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("pixels", "FP32", (PIXELS,)),),
        outputs=(TensorSpec("logits", "FP32", (CLASSES,)),),
        module_factory=lambda: build_wide_module(hidden),
        preprocess=preprocess_digits,
        dataset=train_test_split_digits,
        input_convention=(
            "pixels: FP32 [batch, 64], the 8x8 image row-major, intensities 0..16 divided by 16"
        ),
        builtin=True,  # version 1 is bootstrapped from the digits data, like digits'
    )


WIDE = wide_spec()
