"""Produce version 1: ``python -m pump_health.pretrain [OUT]`` trains on bench data and
writes the state_dict as safetensors (default: the package's weights file).

Deterministic: a fixed seed, one CPU thread, full-batch Adam; the same torch build writes
the same tensors (the example's test checks the committed file against a fresh run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from pump_health.data import generate
from pump_health.model import PumpNet
from pump_health.spec import WEIGHTS

SAMPLES = 600
STEPS = 60
SEED = 7


def pretrain() -> dict[str, torch.Tensor]:
    """The version-1 state_dict, trained on bench data only."""
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x, y = generate(SAMPLES, seed=SEED, field=False)
    window = torch.from_numpy(x["window"])
    machine = torch.from_numpy(x["machine_type"])
    target = torch.from_numpy(y)
    net = PumpNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(window, machine), target)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        opt.step()
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(pretrain(), str(args.out))


if __name__ == "__main__":
    main()
