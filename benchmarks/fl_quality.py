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

Two more sections (``--sections``, default all):

- ``compression``: the default recipe with each update encoded as an edge sends it
  (``fedcore.compression``: fp16, int8 and top-k with the error-feedback residual kept per
  edge across rounds) and decoded as the trainer does: mean bytes per round and final
  accuracy against FP32. Goal: at least 4x fewer bytes for at most 0.5 points lost.
- ``hard``: harder settings, each against centralised: Dirichlet(0.1) label skew; 20 edges
  of which 25% (5, a seeded random cohort) take part in each round; central DP
  (``dp_fedavg``) at epsilon 8 (delta 1e-5) over the 20 rounds, 20 edges all taking part,
  the noise multiplier from the trainer's own RDP accountant.

Run: ``.venv/bin/python benchmarks/fl_quality.py`` (a few minutes on 2 cores);
``--sections base`` for the first table alone (about a minute).
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

from fedcore.compression import (
    CompressionSettings,
    ErrorFeedback,
    decode_update,
    encode_update,
    sizes_from_layout,
)
from fedcore.modelrun import proximal_term
from fedcore.models.digits import DIGITS, train_test_split_digits
from fedcore.params import flatten, layout, load_flat
from fedcore.spec import TrainingRecipe
from trainer.bounds import UpdateBounds
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy
from trainer.strategies.accountant import gaussian_epsilon
from trainer.strategies.defaults import (
    DEFAULT_LOCAL,
    DEFAULT_STRATEGY,
    DEFAULT_STRATEGY_OPTIONS,
)

EDGES = 5
ALPHA = 0.3
ROUNDS = 20
SEEDS = (0, 1, 2)
REFERENCE_LOCAL = TrainingRecipe(epochs=1, batch_size=32, lr=0.05, momentum=0.9)


NO_BOUNDS = UpdateBounds(max_samples=10**9, sample_ratio=None, norm_ratio=None, warmup=1)


@dataclass(frozen=True)
class Recipe:
    """A strategy and local recipe; ``bounds``: the trainer's per-update bounds (its
    defaults unless said otherwise, see ``trainer.bounds``)."""

    label: str
    strategy: str
    options: dict[str, object]
    local: TrainingRecipe
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
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainingRecipe, seed: int
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


@dataclass(frozen=True)
class Setting:
    """How the federation runs: edges taking part per round, and how updates travel."""

    participation: float = 1.0
    compression: CompressionSettings | None = None


@dataclass
class Run:
    history: list[float]  # test accuracy after each round
    bytes_per_round: float  # mean over rounds of the payload bytes the edges sent


def federated(
    data: Data,
    parts: list[npt.NDArray[Any]],
    recipe: Recipe,
    seed: int,
    setting: Setting = Setting(),
) -> Run:
    """Test accuracy after each round, and the bytes sent."""
    x_tr, y_tr, x_te, y_te = data
    module = DIGITS.build_module()
    cohort = max(1, round(setting.participation * len(parts)))
    book = RoundBook(
        "digits",
        RoundPolicy(min_updates=cohort, step_backoff=1.0, bounds=recipe.bounds),
        get_strategy(recipe.strategy, **recipe.options),
        version=1,
        digest="0" * 64,
        params=initial_params(seed),
    )
    edges = [f"edge-{e}" for e in range(len(parts))]
    sizes = sizes_from_layout(layout(module))
    feedback = [ErrorFeedback(sum(sizes)) for _ in parts]
    rng = np.random.default_rng(seed + 7)
    history, sent = [], 0
    for rnd in range(ROUNDS):
        chosen = sorted(rng.choice(len(parts), size=cohort, replace=False).tolist())
        book.open([edges[e] for e in chosen], now=float(rnd))
        for e in chosen:
            idx = parts[e]
            load_flat(module, book.params)
            train_local(module, x_tr[idx], y_tr[idx], recipe.local, seed * 10_000 + rnd * 10 + e)
            delta = (flatten(module) - book.params).astype(np.float32)
            if setting.compression is not None:
                encoded = encode_update(delta, sizes, setting.compression, feedback[e])
                sent += len(encoded.data)
                delta = decode_update(encoded.data, encoded.mode, sizes)
            else:
                sent += delta.nbytes
            book.fold(
                Contribution(f"{rnd:016x}{e:016x}", edges[e], len(idx), book.version, 0.0), delta
            )
        book.release(book.version + 1, "0" * 64, book.finalize())
        load_flat(module, book.params)
        history.append(accuracy(module, x_te, y_te))
    return Run(history, sent / ROUNDS)


def first_round(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(history) if acc >= target), None)


COMPRESSION = (
    ("fp32", None),
    ("fp16", CompressionSettings(mode="fp16")),
    ("int8 + EF", CompressionSettings(mode="int8")),
    ("top-k 10% + EF", CompressionSettings(mode="topk", topk_fraction=0.1)),
    ("top-k 1% + EF", CompressionSettings(mode="topk", topk_fraction=0.01)),
)
DP_EPSILON, DP_DELTA, DP_CLIP = 8.0, 1e-5, 1.0
HARD_EDGES = 20


def dp_noise_multiplier(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose ``rounds`` full-participation releases cost at
    most ``epsilon`` under the trainer's RDP accountant (bisection)."""
    low, high = 0.3, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        if gaussian_epsilon(mid, 1.0, rounds, delta) > epsilon:
            low = mid
        else:
            high = mid
    return high


def section_base(data: Data, y_tr: npt.NDArray[Any]) -> None:
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
            hist = federated(data, parts, recipe, seed).history
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


def section_compression(data: Data, y_tr: npt.NDArray[Any]) -> None:
    default = RECIPES[3]
    print(f"\ncompression ({default.label}, {EDGES} edges, Dirichlet({ALPHA}), mean of seeds):")
    print(f"  {'mode':<16} {'bytes/round':>12} {'vs fp32':>8} {'final':>7} {'points':>7}")
    base: tuple[float, float] | None = None
    for label, settings in COMPRESSION:
        runs = [
            federated(
                data,
                dirichlet_split(y_tr, EDGES, ALPHA, seed),
                default,
                seed,
                Setting(1.0, settings),
            )
            for seed in SEEDS
        ]
        sent = statistics.mean(r.bytes_per_round for r in runs)
        final = statistics.mean(r.history[-1] for r in runs)
        base = base or (sent, final)
        print(
            f"  {label:<16} {sent:>12,.0f} {base[0] / sent:>7.1f}x {final:>7.4f}"
            f" {100 * (final - base[1]):>+7.2f}"
        )


def section_hard(data: Data, y_tr: npt.NDArray[Any]) -> None:
    default = RECIPES[3]
    z = dp_noise_multiplier(DP_EPSILON, ROUNDS, DP_DELTA)
    dp = Recipe(
        f"dp_fedavg eps={DP_EPSILON:g}",
        "dp_fedavg",
        {"clip_norm": DP_CLIP, "noise_multiplier": z, "expected_updates": HARD_EDGES},
        DEFAULT_LOCAL,
        NO_BOUNDS,
    )
    cases = (
        (f"Dirichlet(0.1), {EDGES} edges", default, EDGES, 0.1, 1.0),
        (f"{HARD_EDGES} edges, 25% per round", default, HARD_EDGES, ALPHA, 0.25),
        (f"DP eps {DP_EPSILON:g} (z={z:.2f}), {HARD_EDGES} edges", dp, HARD_EDGES, ALPHA, 1.0),
    )
    print(f"\nharder settings (mean of seeds {list(SEEDS)}, {ROUNDS} rounds, vs centralised):")
    centrals = {seed: centralised(data, seed) for seed in SEEDS}
    for label, recipe, edges, alpha, share in cases:
        finals = [
            federated(
                data, dirichlet_split(y_tr, edges, alpha, seed), recipe, seed, Setting(share)
            ).history[-1]
            for seed in SEEDS
        ]
        ratios = [f / centrals[seed] for f, seed in zip(finals, SEEDS, strict=True)]
        print(
            f"  {label:<36} final {statistics.mean(finals):.4f}"
            f"  ratio {statistics.mean(ratios):.3f}  ({recipe.label})"
        )


SECTIONS = {"base": section_base, "compression": section_compression, "hard": section_hard}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
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
    for name in args.sections.split(","):
        SECTIONS[name.strip()](data, y_tr)
    print(f"\nwall time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
