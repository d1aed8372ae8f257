"""The model spec: one typed description per model, from which everything else derives.

From a :class:`ModelSpec` come the torch module (``build_module``), the ONNX export's
input/output names and dynamic batch axis (``fedcore.onnx_export``), the Triton
``config.pbtxt`` (``fedcore.triton_config``) and the python-backend ``model.py``
(``fedcore.triton_model``). Torch is imported lazily: the gateway reads specs without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

if TYPE_CHECKING:
    import torch

Split = tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]  # x/y train, x/y test

# Open Inference Protocol datatype -> (numpy dtype, Triton config type)
DATATYPES: dict[str, tuple[str, str]] = {
    "BOOL": ("bool", "TYPE_BOOL"),
    "UINT8": ("<u1", "TYPE_UINT8"),
    "INT8": ("<i1", "TYPE_INT8"),
    "INT32": ("<i4", "TYPE_INT32"),
    "INT64": ("<i8", "TYPE_INT64"),
    "FP16": ("<f2", "TYPE_FP16"),
    "FP32": ("<f4", "TYPE_FP32"),
    "FP64": ("<f8", "TYPE_FP64"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor; ``shape`` excludes the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ModelSpecError(f"tensor name {self.name!r} must be an identifier")
        if self.datatype not in DATATYPES:
            raise ModelSpecError(f"tensor {self.name!r}: unsupported datatype {self.datatype!r}")
        if any(d < 1 for d in self.shape):
            raise ModelSpecError(f"tensor {self.name!r}: dims must be positive, got {self.shape}")

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(DATATYPES[self.datatype][0])

    @property
    def triton_type(self) -> str:
        return DATATYPES[self.datatype][1]


@dataclass(frozen=True)
class ModelSpec:
    """Everything fedgate needs to know about one served, federated model."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    module_factory: Callable[[], torch.nn.Module] = field(repr=False)
    preprocess: Callable[[NDArray[Any]], NDArray[Any]] = field(repr=False)
    dataset: Callable[[], tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]] = field(
        repr=False
    )
    input_convention: str
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 32)
    max_queue_delay_us: int = 200
    versions_kept: int = 2  # a stable and a candidate version can be loaded side by side
    opset: int = 17

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ModelSpecError(f"model name {self.name!r} must be an identifier")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise ModelSpecError(f"model {self.name!r}: tensor names must be unique, got {names}")
        if not self.inputs or not self.outputs:
            raise ModelSpecError(f"model {self.name!r}: needs at least one input and one output")
        if any(b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ModelSpecError(
                f"model {self.name!r}: preferred batch sizes exceed max_batch_size"
            )

    def build_module(self) -> torch.nn.Module:
        """A fresh torch module for this model (random initial weights)."""
        return self.module_factory()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]
