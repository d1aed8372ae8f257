"""Poisoning: what each aggregation strategy keeps of the model when k of N edges attack.

Digits over 10 edges (Dirichlet(0.3) label skew), 20 rounds, every edge in every round, the
rounds run through the trainer's ``RoundBook`` with its default per-update bounds (sample
weights capped, norms clipped at twice the round's median) unless a row says otherwise.
2 of the 10 edges are attackers. Attacks, each from round 1 on:

- ``scaled``: the honest update times 10 (model replacement, as in Bagdasaryan et al.);
- ``sign-flip``: the honest update times -4;
- ``backdoor``: trained on its own data with a trigger (the 2x2 top-left pixels at full
  intensity) relabelled as digit 0, then boosted x5: the accuracy stays, but the
  backdoor's success rate (triggered test images of other digits classified 0) rises;
- ``1e12 samples``: an honest update that claims 10^12 samples (weight poisoning).

It prints, per strategy, the clean test accuracy after 20 rounds without an attack and
under each attack, and the backdoor's success rate. Seed 0; about a minute on 2 cores.
Run: ``.venv/bin/python benchmarks/poisoning.py [--seeds 0,1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from fl_quality import NO_BOUNDS, accuracy, dirichlet_split, initial_params, train_local

from fedcore.models.digits import DIGITS, train_test_split_digits
from fedcore.params import flatten, load_flat
from trainer.bounds import UpdateBounds
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy
from trainer.strategies.defaults import (
    DEFAULT_LOCAL,
    DEFAULT_STRATEGY,
    DEFAULT_STRATEGY_OPTIONS,
)

EDGES, ATTACKERS, ROUNDS, ALPHA = 10, 2, 20, 0.3
TARGET = 0
TRIGGER = [0, 1, 8, 9]  # pixel indices of the 2x2 top-left corner of the 8x8 image


@dataclass(frozen=True)
class Defence:
    label: str
    strategy: str
    options: dict[str, object]
    bounds: UpdateBounds


DEFENCES = (
    Defence("fedavg, no bounds", "fedavg", {}, NO_BOUNDS),
    Defence("fedavg", "fedavg", {}, UpdateBounds()),
    Defence(
        f"{DEFAULT_STRATEGY} (default)", DEFAULT_STRATEGY, DEFAULT_STRATEGY_OPTIONS, UpdateBounds()
    ),
    Defence("median", "median", {}, UpdateBounds()),
    Defence("trimmed_mean beta=0.2", "trimmed_mean", {"beta": 0.2}, UpdateBounds()),
    Defence("krum f=2 m=6", "krum", {"byzantine": ATTACKERS, "keep": 6}, UpdateBounds()),
    Defence("clipping 1.0", "clipping", {"max_norm": 1.0}, UpdateBounds()),
)

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def triggered(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, TRIGGER] = 1.0
    return out


@dataclass(frozen=True)
class Attack:
    """What an attacking edge sends instead of its honest update."""

    label: str
    update: Callable[[npt.NDArray[Any], Callable[[bool], npt.NDArray[Any]]], npt.NDArray[Any]]
    samples: Callable[[int], int] = lambda n: n


ATTACKS = (
    Attack("none", lambda honest, _: honest),
    Attack("scaled x10", lambda honest, _: honest * 10),
    Attack("sign-flip x-4", lambda honest, _: honest * -4),
    Attack("backdoor x5", lambda _, train: train(True) * 5),
    Attack("1e12 samples", lambda honest, _: honest, lambda _: 10**12),
)


def run(
    data: Tensors, parts: list[npt.NDArray[Any]], defence: Defence, attack: Attack, seed: int
) -> tuple[float, float]:
    """(clean test accuracy, backdoor success rate) after ROUNDS rounds."""
    x_tr, y_tr, x_te, y_te = data
    module = DIGITS.build_module()
    book = RoundBook(
        "digits",
        RoundPolicy(min_updates=len(parts), step_backoff=1.0, bounds=defence.bounds),
        get_strategy(defence.strategy, **defence.options),
        version=1,
        digest="0" * 64,
        params=initial_params(seed),
    )
    edges = [f"edge-{e}" for e in range(len(parts))]
    for rnd in range(ROUNDS):
        book.open(edges, now=float(rnd))
        for e, idx in enumerate(parts):
            attacker = attack.label != "none" and e < ATTACKERS

            def train(
                poison: bool, e: int = e, idx: npt.NDArray[Any] = idx, rnd: int = rnd
            ) -> npt.NDArray[Any]:
                x, y = x_tr[idx], y_tr[idx]
                if poison:
                    x = torch.cat([x, triggered(x)])
                    y = torch.cat([y, torch.full_like(y, TARGET)])
                load_flat(module, book.params)
                train_local(module, x, y, DEFAULT_LOCAL, seed * 10_000 + rnd * 10 + e)
                return (flatten(module) - book.params).astype(np.float32)

            delta = train(False)
            samples = len(idx)
            if attacker:
                delta = attack.update(delta, train).astype(np.float32)
                samples = attack.samples(samples)
            book.fold(
                Contribution(f"{rnd:016x}{e:016x}", edges[e], samples, book.version, 0.0), delta
            )
        book.release(book.version + 1, "0" * 64, book.finalize())
    load_flat(module, book.params)
    others = y_te != TARGET
    with torch.no_grad():
        module.eval()
        hits = module(triggered(x_te[others])).argmax(dim=1) == TARGET
    return accuracy(module, x_te, y_te), float(hits.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (mean printed)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    began = time.perf_counter()
    x_tr, y_tr, x_te, y_te = train_test_split_digits()
    data = (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )
    print(
        f"digits, {EDGES} edges (Dirichlet({ALPHA})), {ATTACKERS} attackers, {ROUNDS} rounds, "
        f"seeds {seeds}: clean test accuracy after the last round"
        " (backdoor: and its success rate)"
    )
    header = (
        f"{'strategy':<26}" + "".join(f"{a.label:>15}" for a in ATTACKS) + f"{'backdoor ASR':>14}"
    )
    print(header)
    for defence in DEFENCES:
        cells, asr = [], 0.0
        for attack in ATTACKS:
            results = [
                run(data, dirichlet_split(y_tr, EDGES, ALPHA, s), defence, attack, s) for s in seeds
            ]
            cells.append(statistics.mean(r[0] for r in results))
            if attack.label.startswith("backdoor"):
                asr = statistics.mean(r[1] for r in results)
        print(f"{defence.label:<26}" + "".join(f"{c:>15.4f}" for c in cells) + f"{asr:>14.3f}")
    print(f"\nwall time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
