"""User-style model specs for the tests: what a user's package would hold.

``make_multi(weights)``: two inputs (FP32 features and a variable-length INT64 id
sequence), two outputs (FP32 scores and their sum), a regression task on ``score`` that
spools only the fixed-shape tensors. ``save_weights`` writes a module's state_dict as
safetensors, as a user would for ``initial_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fedcore.spec import ModelSpec, TensorSpec, TrainingRecipe
from fedcore.task import LabelKind, Loss, Task

DENSE = 4
VOCAB = 16


class TwoTower(nn.Module):
    """score = linear(dense) + mean(embedding(ids)); total = sum of the score's values."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(DENSE, 2)
        self.embed = nn.Embedding(VOCAB, 2)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.dense(dense) + self.embed(ids.clamp(0, VOCAB - 1)).mean(dim=1)
        return score, score.sum(dim=1, keepdim=True)


def make_multi(weights: Path, name: str = "twotower") -> ModelSpec:
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("dense", "FP32", (DENSE,)), TensorSpec("ids", "INT64", (-1,))),
        outputs=(TensorSpec("score", "FP32", (2,)), TensorSpec("total", "FP32", (1,))),
        module_factory=TwoTower,
        task=Task(
            loss=Loss.MSE,
            label=LabelKind.VECTOR,
            metric="mae",
            output="score",
            capture_inputs=("dense",),
        ),
        recipe=TrainingRecipe(optimizer="adam", lr=0.01),
        initial_weights=weights,
    )


def save_weights(module: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path
