"""The torch module: a sensor window FP32 [T, C] and a machine type INT64 [1] -> logits [3].

Per channel, the window is summarised by a 1-D convolution (local shapes: impulses, ramps)
pooled over time; the machine type is embedded (each type runs at its own baseline
temperature and current). Both meet in a small MLP.
"""

from __future__ import annotations

import torch
from torch import nn

WINDOW = 32
"""Time steps per window (one second at 32 Hz)."""
CHANNELS = 3
"""vibration (g), bearing temperature (deg C), motor current (A), in that order."""
MACHINE_TYPES = 4
CLASSES = 3
"""0 normal, 1 bearing wear (vibration impulses), 2 overheating (temperature ramp)."""
_SCALE = (1.0, 0.05, 0.1)
"""Per-channel scale so every channel enters the net near unit range."""
_OFFSET = (0.0, 60.0, 10.0)


class PumpNet(nn.Module):
    """logits = mlp(pooled conv(window), embedding(machine_type))."""

    offset: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(_OFFSET).view(1, CHANNELS, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, CHANNELS, 1))
        self.conv = nn.Conv1d(CHANNELS, 16, kernel_size=5, padding=2)
        self.machine = nn.Embedding(MACHINE_TYPES, 4)
        self.head = nn.Sequential(nn.Linear(32 + 4, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, window: torch.Tensor, machine_type: torch.Tensor) -> torch.Tensor:
        x = (window.transpose(1, 2) - self.offset) * self.scale  # [n, C, T]
        h = torch.relu(self.conv(x))
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)  # [n, 32]
        kind = self.machine(machine_type.reshape(-1).clamp(0, MACHINE_TYPES - 1))
        out: torch.Tensor = self.head(torch.cat([pooled, kind], dim=1))
        return out
