"""Federated quality on digits: FedAvg, FedProx, FedAdam and the default recipe against
centralised training of the same model.

Digits (scikit-learn, fixed stratified split) is spread over 5 edges with a
Dirichlet(0.3) label skew; every edge takes part in each of 20 rounds. For seeds
0, 1, 2 it prints per strategy the final test accuracy, its ratio to the centralised
accuracy, and the first round whose accuracy reaches 95% of it, then the means.

The reference numbers (plain FedAvg, Flower's ``aggregate``): final ratio 0.943, 0.973,
0.966 (mean 0.961); 95% first reached at rounds 18, 10, 18. Target for the default:
mean ratio >= 0.98 after 20 rounds and 95% reached within 10 rounds.

Centralised baseline: the same model, initialisation and optimiser settings as the
reference local recipe (SGD lr 0.05, momentum 0.9, batch 32), trained on the whole
train split for 20 epochs (= 20 rounds x 1 local epoch of the reference).

For context it also prints the centralised accuracy after 3x the epochs: the 20-epoch
baseline is not fully converged, so a strong federated recipe can end slightly above it.

Rounds run through the trainer's ``RoundBook`` with its default per-update bounds
(``trainer.bounds``: weights capped at twice the round's median sample count, norms
clipped at twice its median norm); the last row is the default without them.

Run: ``.venv/bin/python benchmarks/fl_quality.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedcore.models.digits import DIGITS, train_test_split_digits
from fedcore.params import flatten, load_flat
from trainer.bounds import UpdateBounds
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy, proximal_term
from trainer.strategies.defaults import (
    DEFAULT_LOCAL,
    DEFAULT_STRATEGY,
    DEFAULT_STRATEGY_OPTIONS,
    LocalRecipe,
)

EDGES = 5
ALPHA = 0.3
ROUNDS = 20
SEEDS = (0, 1, 2)
REFERENCE_LOCAL = LocalRecipe(epochs=1, batch_size=32, lr=0.05, momentum=0.9)


NO_BOUNDS = UpdateBounds(max_samples=10**9, sample_ratio=None, norm_ratio=None, warmup=1)


@dataclass(frozen=True)
class Recipe:
    """A strategy and local recipe; ``bounds``: the trainer's per-update bounds (its
    defaults unless said otherwise, see ``trainer.bounds``)."""

    label: str
    strategy: str
    options: dict[str, object]
    local: LocalRecipe
    bounds: UpdateBounds = field(default_factory=UpdateBounds)


RECIPES = (
    Recipe("fedavg", "fedavg", {}, REFERENCE_LOCAL),
    Recipe("fedprox mu=0.01", "fedprox", {"mu": 0.01}, replace(REFERENCE_LOCAL, proximal_mu=0.01)),
    Recipe("fedadam eta=0.1", "fedadam", {"eta": 0.1}, REFERENCE_LOCAL),
    Recipe(
        f"DEFAULT {DEFAULT_STRATEGY}", DEFAULT_STRATEGY, DEFAULT_STRATEGY_OPTIONS, DEFAULT_LOCAL
    ),
    Recipe(
        f"{DEFAULT_STRATEGY} without bounds",
        DEFAULT_STRATEGY,
        DEFAULT_STRATEGY_OPTIONS,
        DEFAULT_LOCAL,
        NO_BOUNDS,
    ),
)


def dirichlet_split(
    y: npt.NDArray[Any], edges: int, alpha: float, seed: int
) -> list[npt.NDArray[Any]]:
    """Per class, Dirichlet(alpha) shares of its samples go to the edges (each >= 10)."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(edges)]
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * edges))[:-1] * len(idx)).astype(int)
            for e, chunk in enumerate(np.split(idx, cuts)):
                parts[e].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 10:
            return [np.array(sorted(p)) for p in parts]


def train_local(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: LocalRecipe, seed: int
) -> None:
    opt = torch.optim.SGD(
        module.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    anchor = [p.detach().clone() for p in module.parameters()]
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = loss_fn(module(x[batch]), y[batch])
            if recipe.proximal_mu > 0:
                loss = loss + proximal_term(module.parameters(), anchor, recipe.proximal_mu)
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return float((module(x).argmax(dim=1) == y).float().mean())


def initial_params(seed: int) -> npt.NDArray[Any]:
    torch.manual_seed(seed)
    return flatten(DIGITS.build_module())


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def centralised(data: Data, seed: int, epochs: int = ROUNDS) -> float:
    x_tr, y_tr, x_te, y_te = data
    module = DIGITS.build_module()
    load_flat(module, initial_params(seed))
    train_local(module, x_tr, y_tr, replace(REFERENCE_LOCAL, epochs=epochs), seed)
    return accuracy(module, x_te, y_te)


def federated(data: Data, parts: list[npt.NDArray[Any]], recipe: Recipe, seed: int) -> list[float]:
    """Test accuracy after each round."""
    x_tr, y_tr, x_te, y_te = data
    module = DIGITS.build_module()
    book = RoundBook(
        "digits",
        RoundPolicy(min_updates=len(parts), step_backoff=1.0, bounds=recipe.bounds),
        get_strategy(recipe.strategy, **recipe.options),
        version=1,
        digest="0" * 64,
        params=initial_params(seed),
    )
    edges = [f"edge-{e}" for e in range(len(parts))]
    history = []
    for rnd in range(ROUNDS):
        book.open(edges, now=float(rnd))
        for e, idx in enumerate(parts):
            load_flat(module, book.params)
            train_local(module, x_tr[idx], y_tr[idx], recipe.local, seed * 10_000 + rnd * 10 + e)
            delta = (flatten(module) - book.params).astype(np.float32)
            book.fold(
                Contribution(f"{rnd:016x}{e:016x}", edges[e], len(idx), book.version, 0.0), delta
            )
        book.advance(book.version + 1, "0" * 64, book.finalize())
        load_flat(module, book.params)
        history.append(accuracy(module, x_te, y_te))
    return history


def first_round(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(history) if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    x_tr, y_tr, x_te, y_te = train_test_split_digits()
    data = (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )
    print(f"digits: {len(y_tr)} train / {len(y_te)} test, {EDGES} edges, Dirichlet({ALPHA})")
    print(f"default recipe: {DEFAULT_STRATEGY} {DEFAULT_STRATEGY_OPTIONS} local {DEFAULT_LOCAL}")
    results: dict[str, list[tuple[float, float, int | None]]] = {r.label: [] for r in RECIPES}
    for seed in SEEDS:
        parts = dirichlet_split(y_tr, EDGES, ALPHA, seed)
        central = centralised(data, seed)
        longer = centralised(data, seed, 3 * ROUNDS)
        sizes = [len(p) for p in parts]
        print(
            f"\nseed {seed}: edge sizes {sizes}, centralised {ROUNDS} epochs {central:.4f}"
            f" ({3 * ROUNDS} epochs, context only: {longer:.4f})"
        )
        for recipe in RECIPES:
            hist = federated(data, parts, recipe, seed)
            r95 = first_round(hist, 0.95 * central)
            results[recipe.label].append((hist[-1], hist[-1] / central, r95))
            print(
                f"  {recipe.label:<24} final {hist[-1]:.4f}  ratio {hist[-1] / central:.3f}"
                f"  95% at round {r95}"
            )
    print(f"\nmean over seeds {list(SEEDS)} ({ROUNDS} rounds):")
    for label, rows in results.items():
        ratios = [r[1] for r in rows]
        rounds = [r[2] if r[2] is not None else ROUNDS + 1 for r in rows]
        print(
            f"  {label:<24} final {statistics.mean(r[0] for r in rows):.4f}"
            f"  ratio {statistics.mean(ratios):.3f}  95% at rounds {[r[2] for r in rows]}"
            f" (mean {statistics.mean(rounds):.1f})"
        )
    print(f"\nwall time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
