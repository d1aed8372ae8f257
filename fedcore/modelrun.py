"""Running a spec's torch module on named inputs, whatever its forward returns.

A module takes the spec's inputs positionally, in declared order, and returns one tensor
(one-output models), a tuple or list in the declared output order, or a mapping by output
name. Torch is imported lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError
from fedcore.spec import Feeds, ModelSpec, TrainingRecipe

if TYPE_CHECKING:
    import torch


def to_tensors(spec: ModelSpec, feeds: Feeds, device: Any = None) -> list[torch.Tensor]:
    """The spec's inputs as torch tensors, in declared order."""
    import torch

    out = []
    for t in spec.inputs:
        tensor = torch.from_numpy(np.ascontiguousarray(feeds[t.name], dtype=t.numpy_dtype))
        out.append(tensor if device is None else tensor.to(device))
    return out


def forward(spec: ModelSpec, module: torch.nn.Module, inputs: list[torch.Tensor]) -> dict[str, Any]:
    """``module(*inputs)`` as outputs by name."""
    result = module(*inputs)
    names = spec.output_names
    if isinstance(result, Mapping):
        missing = [n for n in names if n not in result]
        if missing:
            raise ModelSpecError(f"model {spec.name!r}: forward returned no {missing}")
        return {n: result[n] for n in names}
    if isinstance(result, tuple | list):
        if len(result) != len(names):
            raise ModelSpecError(
                f"model {spec.name!r}: forward returned {len(result)} outputs, "
                f"the spec declares {len(names)}"
            )
        return dict(zip(names, result, strict=True))
    if len(names) != 1:
        raise ModelSpecError(
            f"model {spec.name!r}: forward returned one tensor, the spec declares {names}"
        )
    return {names[0]: result}


def target_output(
    spec: ModelSpec, module: torch.nn.Module, inputs: list[torch.Tensor]
) -> torch.Tensor:
    """The output the task's loss and metric read."""
    out: torch.Tensor = forward(spec, module, inputs)[spec.target.name]
    return out


def predict(spec: ModelSpec, module: torch.nn.Module, feeds: Feeds) -> dict[str, NDArray[Any]]:
    """Every output of ``module`` on ``feeds`` as numpy arrays (eval mode, no grad)."""
    import torch

    module.eval()
    with torch.no_grad():
        outs = forward(spec, module, to_tensors(spec, feeds))
    return {n: v.detach().cpu().numpy() for n, v in outs.items()}


def make_optimizer(
    recipe: TrainingRecipe, module: torch.nn.Module, lr: float | None = None
) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``module``'s parameters (``lr`` overrides the recipe's)."""
    import torch

    rate = recipe.lr if lr is None else lr
    if recipe.optimizer == "adam":
        return torch.optim.Adam(module.parameters(), lr=rate, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        module.parameters(), lr=rate, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )


def proximal_term(
    local: Iterable[torch.Tensor], global_: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum_k ||local_k - global_k||^2`` over paired
    tensors (differentiable): the one definition, for the edge's worker and the trainer's
    strategy alike.

    ``local`` are the trainable parameters, ``global_`` copies of the base version's, in
    the same order (detached here). Its gradient w.r.t. ``local_k`` is
    ``mu * (local_k - global_k)``.
    """
    total: torch.Tensor | None = None
    for w, g in zip(local, global_, strict=True):
        sq = (w - g.detach()).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("proximal_term needs at least one tensor pair")
    return total * (mu / 2.0)
