"""The model spec fedgate reads (entry point ``pump_health`` in group ``fedgate.models``)."""

from __future__ import annotations

from pathlib import Path

from fedcore.spec import ModelSpec, TensorSpec, TrainingRecipe
from fedcore.task import LabelKind, Loss, Task
from pump_health.data import demo_data
from pump_health.model import CHANNELS, CLASSES, WINDOW, PumpNet

WEIGHTS = Path(__file__).parent / "weights" / "pump_health-v1.safetensors"
"""Version 1: trained on bench data by ``python -m pump_health.pretrain``."""

SPEC = ModelSpec(
    name="pump_health",
    inputs=(
        TensorSpec("window", "FP32", (WINDOW, CHANNELS)),
        TensorSpec("machine_type", "INT64", (1,)),
    ),
    outputs=(TensorSpec("fault_logits", "FP32", (CLASSES,)),),
    module_factory=PumpNet,
    task=Task(loss=Loss.CROSS_ENTROPY, label=LabelKind.CLASS, metric="accuracy"),
    # small steps: the trainer's default strategy (fedavgm, eta 2) doubles the mean update
    recipe=TrainingRecipe(optimizer="adam", lr=0.001, epochs=3, batch_size=16),
    initial_weights=WEIGHTS,
    # no evaluation_set: the trainer holds no pump data; the edges evaluate candidates
    demo_data=demo_data,
)
