"""The model spec: one typed description per model, from which everything else derives.

From a :class:`ModelSpec` come the torch module (``build_module``), the ONNX export's
input/output names and dynamic batch axis (``fedcore.onnx_export``), the Triton
``config.pbtxt`` (``fedcore.triton_config``) and the python-backend ``model.py``
(``fedcore.triton_model``). Torch is imported lazily: the gateway reads specs without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import ConfigDict

from fedcore.errors import ModelSpecError
from fedcore.task import Task

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

if TYPE_CHECKING:
    import torch

Split = tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]  # x/y train, x/y test

# Open Inference Protocol datatype -> (numpy dtype, Triton config type): every datatype
# the data plane forwards that numpy, ONNX Runtime and torch all hold (not BF16, BYTES).
DATATYPES: dict[str, tuple[str, str]] = {
    "BOOL": ("bool", "TYPE_BOOL"),
    "UINT8": ("<u1", "TYPE_UINT8"),
    "UINT16": ("<u2", "TYPE_UINT16"),
    "UINT32": ("<u4", "TYPE_UINT32"),
    "UINT64": ("<u8", "TYPE_UINT64"),
    "INT8": ("<i1", "TYPE_INT8"),
    "INT16": ("<i2", "TYPE_INT16"),
    "INT32": ("<i4", "TYPE_INT32"),
    "INT64": ("<i8", "TYPE_INT64"),
    "FP16": ("<f2", "TYPE_FP16"),
    "FP32": ("<f4", "TYPE_FP32"),
    "FP64": ("<f8", "TYPE_FP64"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor; ``shape`` excludes the batch dimension; -1 is a variable dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ModelSpecError(f"tensor name {self.name!r} must be an identifier")
        if self.datatype not in DATATYPES:
            raise ModelSpecError(
                f"tensor {self.name!r}: unsupported datatype {self.datatype!r}; "
                f"supported: {sorted(DATATYPES)}"
            )
        if any(d < 1 and d != -1 for d in self.shape):
            raise ModelSpecError(
                f"tensor {self.name!r}: dims must be positive or -1, got {self.shape}"
            )

    @property
    def fixed(self) -> bool:
        """Whether every dim (past the batch) is known."""
        return all(d > 0 for d in self.shape)

    @property
    def width(self) -> int:
        """Values per row (fixed shapes only)."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(DATATYPES[self.datatype][0])

    @property
    def triton_type(self) -> str:
        return DATATYPES[self.datatype][1]


@dataclass(frozen=True)
class TrainingRecipe:
    """How a model is trained locally: the one definition of the recipe and its defaults.

    A model's spec holds its recipe; everything else only overrides fields of it
    (:meth:`overridden`): the edge's ``TRAIN_*`` settings, the trainer's ``LOCAL_*``
    settings (its bootstrap and, through a round's announcement, the edges: any of
    ``proximal_mu``, ``epochs``, ``lr``, ``batch_size``, ``max_steps``, over the edge's).
    ``proximal_mu`` > 0 adds FedProx's proximal term
    (:func:`fedcore.modelrun.proximal_term`); ``max_steps`` (None: no bound) is the most
    mini-batches of one local run. Decoded by pydantic (the worker's job file), unknown
    fields are refused."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    proximal_mu: float = 0.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ModelSpecError(f"recipe.optimizer: {self.optimizer!r} is not sgd or adam")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ModelSpecError("recipe: lr must be > 0, momentum in [0, 1), weight_decay >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ModelSpecError("recipe: epochs and batch_size must be at least 1")
        if self.proximal_mu < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ModelSpecError("recipe: proximal_mu must be >= 0, max_steps >= 1")

    def overridden(self, **overrides: Any) -> TrainingRecipe:
        """This recipe with every field given a value (not None) replaced, checked again."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise ModelSpecError(f"recipe: no field {', '.join(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self


Feeds = dict[str, NDArray[Any]]
"""A batch of inputs by tensor name."""
DataSplit = tuple[Any, NDArray[Any], Any, NDArray[Any]]
"""(x_train, y_train, x_test, y_test); x is an array for a one-input model, else Feeds."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything fedgate needs to know about one served, federated model.

    Version 1 comes from ``initial_weights`` (a safetensors file of the module's
    ``state_dict``), or for a built-in model without one, from a short training run on
    its ``dataset``. ``dataset`` (built-ins) also gives the trainer its evaluation set;
    ``evaluation_set`` (``.npz`` or safetensors) does the same for a user's model.
    ``demo_data`` is only the demo's traffic.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    module_factory: Callable[[], torch.nn.Module] = field(repr=False)
    task: Task = field(default_factory=Task)
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    initial_weights: Path | None = None
    evaluation_set: Path | None = None
    dataset: Callable[[], DataSplit] | None = field(default=None, repr=False)
    demo_data: Callable[[], DataSplit] | None = field(default=None, repr=False)
    """traffic for ``fedgate demo`` (a generator of the package's own): a training split
    the demo's sites replay and a held-out split it scores; never given to the trainer.
    Without it the demo replays ``dataset``."""
    preprocess: Callable[[NDArray[Any]], NDArray[Any]] | None = field(default=None, repr=False)
    input_convention: str = ""
    builtin: bool = False
    bootstrap_lr: float = 0.1
    """learning rate of a built-in's version-1 bootstrap (with the recipe's optimiser)"""
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
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ModelSpecError(f"model {self.name!r}: duplicate tensor names {dup}")
        if not self.inputs or not self.outputs:
            raise ModelSpecError(f"model {self.name!r}: needs at least one input and one output")
        _check_task(self)
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

    @property
    def target(self) -> TensorSpec:
        """The output the loss and the metric read."""
        wanted = self.task.output or self.outputs[0].name
        return next(t for t in self.outputs if t.name == wanted)

    @property
    def captured_inputs(self) -> tuple[TensorSpec, ...]:
        wanted = self.task.capture_inputs
        return tuple(t for t in self.inputs if wanted is None or t.name in wanted)

    @property
    def captured_outputs(self) -> tuple[TensorSpec, ...]:
        wanted = self.task.capture_outputs
        return tuple(t for t in self.outputs if wanted is None or t.name in wanted)

    @property
    def trainable(self) -> bool:
        """Whether edges can fine-tune it: every input is captured."""
        return len(self.captured_inputs) == len(self.inputs)

    def feeds(self, x: Any) -> Feeds:
        """A batch as inputs by name: ``x`` is an array (one-input models) or a mapping."""
        if isinstance(x, dict):
            missing = [t.name for t in self.inputs if t.name not in x]
            if missing:
                raise ModelSpecError(f"model {self.name!r}: batch lacks inputs {missing}")
            return {t.name: np.asarray(x[t.name], dtype=t.numpy_dtype) for t in self.inputs}
        if len(self.inputs) != 1:
            raise ModelSpecError(f"model {self.name!r} has several inputs; pass them by name")
        return {self.inputs[0].name: np.asarray(x, dtype=self.inputs[0].numpy_dtype)}


def _check_task(spec: ModelSpec) -> None:
    """The task names tensors the spec has, with fixed shapes where they are spooled."""
    task, where = spec.task, f"model {spec.name!r}"
    outputs = {t.name: t for t in spec.outputs}
    if task.output is not None and task.output not in outputs:
        raise ModelSpecError(f"{where}: task.output names no output: {task.output!r}")
    for field_name, chosen, have in (
        ("capture_inputs", task.capture_inputs, spec.inputs),
        ("capture_outputs", task.capture_outputs, spec.outputs),
    ):
        unknown = sorted(set(chosen or ()) - {t.name for t in have})
        if unknown:
            raise ModelSpecError(f"{where}: task.{field_name} names no tensor: {unknown}")
    for t in (*spec.captured_inputs, *spec.captured_outputs):
        if not t.fixed:
            raise ModelSpecError(
                f"{where}: tensor {t.name!r} has a variable dim {t.shape} and is captured; "
                "leave it out of task.capture_inputs/capture_outputs"
            )
    target = spec.target
    if not target.fixed:
        raise ModelSpecError(f"{where}: task.output {target.name!r} needs a fixed shape")
    if task.label.value == "class" and target.width < 2:
        raise ModelSpecError(f"{where}: class labels need an output of at least 2 values")
