"""The live loop against the simulation of the same algorithm on the same data.

Live: the real stack (``fedgate.launcher.Stack``: NATS, trainer, gateway, N edges each
with its own Triton), driven the way ``fedgate demo`` drives it (``fedgate.demo``): each
round replays ``--per-edge`` labelled requests per site through the gateway, sends the
labels back, goes quiet so the edges fine-tune, waits for the trainer's round record
and, when a version is released, drives canary traffic until the rollout settles.

Simulation: the same digits sites (``fedgate.demo.split_sites``, Dirichlet(alpha) label
skew, the same seed), the same version 1 (``trainer.bootstrap.initial_params`` with the
trainer's default settings), the same server strategy, per-update bounds and local recipe,
and the same number of rounds, run in process through the trainer's ``RoundBook`` with
``benchmarks.fl_quality.train_local``: every edge trains one epoch over its whole site
per round. No gate, no traffic: the algorithm alone.

Both are scored on the digits test split, the trainer's gate set. It prints, per round,
the simulated accuracy, the live candidate's accuracy (the trainer's evaluation), the
live serving version's accuracy and the gap (live serving minus simulated), then the
final live accuracy measured through the gateway. Goal: live final >= simulated final
minus 1 point.

Run: ``.venv/bin/python benchmarks/live_loop.py`` (3 edges, 10 rounds: several minutes on
2 cores). ``--edge KEY=VALUE`` / ``--trainer KEY=VALUE`` override settings
(``FEDGATE_EDGE_KEY``, ``FEDGATE_TRAINER_KEY``) to compare changes in one run each;
``--sim-only`` runs the simulation alone (seconds). ``--exposure traffic`` simulates what a
live edge trains on instead of its whole site (its spool: ``--per-edge`` draws a round, 80%
kept, the rest its held-out split), ``--max-steps N`` bounds each simulated local run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fl_quality import accuracy, train_local
from fedcore.models import get_spec
from fedcore.params import flatten, load_flat
from fedcore.process import free_port
from fedgate.demo import (
    DemoPlan,
    GatewayClient,
    RoundRow,
    demo_overrides,
    metric_through_gateway,
    run_round,
    split_sites,
)
from fedgate.launcher import Stack, StackConfig, supervised
from trainer.bootstrap import initial_params
from trainer.bounds import UpdateBounds
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.settings import TrainerSettings
from trainer.strategies.defaults import DEFAULT_LOCAL, default_strategy

MODEL = "digits"


@dataclass(frozen=True)
class Args:
    edges: int
    rounds: int
    per_edge: int
    alpha: float
    seed: int
    edge: dict[str, str]
    trainer: dict[str, str]
    sim_runs: int = 5
    exposure: str = "site"
    """``site``: each edge trains on its whole site every round (the algorithm);
    ``traffic``: on what a live edge's spool holds, ``per_edge`` draws a round of which
    ``1 - holdout`` are kept for training"""
    holdout: float = 0.2
    max_steps: int | None = None
    """the most mini-batches of one simulated local run (None: one epoch)"""


def version_one() -> npt.NDArray[Any]:
    """The trainer's version 1 of digits, as it bootstraps it with its default settings."""
    fields = TrainerSettings.model_fields
    return initial_params(
        get_spec(MODEL),
        float(fields["bootstrap_seed_fraction"].default),
        int(fields["bootstrap_epochs"].default),
        int(fields["seed"].default),
    )


def simulate(args: Args, run: int = 0) -> tuple[float, list[float]]:
    """Version 1's test accuracy and the accuracy after each simulated round; ``run``
    seeds the local training's mini-batch order (the sites stay the same)."""
    spec = get_spec(MODEL)
    assert spec.dataset is not None
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(a) for a in spec.dataset())
    edges = [f"edge-{i}" for i in range(args.edges)]
    sites = split_sites(y_tr.numpy(), edges, args.alpha, args.seed)
    module = spec.build_module()
    start = version_one()
    load_flat(module, start)
    base = accuracy(module, x_te, y_te)
    book = RoundBook(
        MODEL,
        RoundPolicy(min_updates=args.edges, bounds=UpdateBounds()),
        default_strategy(),
        version=1,
        digest="0" * 64,
        params=start,
    )
    history = []
    spools: list[list[int]] = [[] for _ in sites]
    for rnd in range(args.rounds):
        book.open(edges, now=float(rnd))
        rng = np.random.default_rng(args.seed * 1000 + rnd + 100 * run)
        for e, site in enumerate(sites):
            load_flat(module, book.params)
            idx = local_samples(args, site.pool, spools[e], rng)
            train_local(
                module, x_tr[idx], y_tr[idx], DEFAULT_LOCAL, args.seed * 1000 + rnd + 100 * run
            )
            delta = (flatten(module) - book.params).astype(np.float32)
            book.fold(Contribution(f"{rnd:016x}{e:016x}", site.edge, len(idx), 1, 0.0), delta)
        book.release(book.version + 1, "0" * 64, book.finalize())
        load_flat(module, book.params)
        history.append(accuracy(module, x_te, y_te))
    return base, history


def local_samples(
    args: Args, pool: npt.NDArray[Any], spool: list[int], rng: np.random.Generator
) -> torch.Tensor:
    """The training indices of one simulated local run (``spool`` grows in place)."""
    if args.exposure == "site":
        chosen = pool
    else:
        picks = rng.choice(pool, size=args.per_edge, replace=True)
        spool.extend(picks[rng.random(len(picks)) >= args.holdout].tolist())
        chosen = np.array(spool, dtype=np.int64)
    if args.max_steps is not None and len(chosen) > args.max_steps * DEFAULT_LOCAL.batch_size:
        chosen = rng.permutation(chosen)[: args.max_steps * DEFAULT_LOCAL.batch_size]
    return torch.from_numpy(np.asarray(chosen, dtype=np.int64))


async def drive_live(stack: Stack, args: Args) -> tuple[float, list[RoundRow], float]:
    spec = get_spec(MODEL)
    assert spec.dataset is not None
    x_tr, y_tr, x_te, y_te = spec.dataset()
    plan = DemoPlan(rounds=args.rounds, per_edge=args.per_edge, alpha=args.alpha, seed=args.seed)
    sites = split_sites(y_tr, stack.edge_ids, plan.alpha, plan.seed)
    client = GatewayClient(stack.gateway_url, stack.api_key("infer"), stack.api_key("admin"), spec)
    rows: list[RoundRow] = []
    try:
        base, _ = await metric_through_gateway(client, x_te, y_te, plan.concurrency)
        for n in range(1, args.rounds + 1):
            rows.append(await run_round(n, client, sites, (x_tr, y_tr), plan, _quiet))
            print(f"  live round {n}: {rows[-1].value} {rows[-1].released}", flush=True)
        final, _ = await metric_through_gateway(client, x_te, y_te, plan.concurrency)
    finally:
        await client.close()
    return base, rows, final


def _quiet(line: str) -> None:
    if "..." not in line:
        print(f"    {line}", flush=True)


def live(args: Args) -> tuple[float, list[RoundRow], float]:
    overrides = demo_overrides(args.edges, args.rounds)
    overrides["FEDGATE_EDGE_"].update(args.edge)
    overrides["FEDGATE_TRAINER_"].update(args.trainer)
    with tempfile.TemporaryDirectory(prefix="live-loop-") as tmp:
        config = StackConfig(
            data_dir=Path(tmp), edges=args.edges, port=free_port(), overrides=overrides
        )
        stack = Stack(config)
        try:
            stack.start()
            return asyncio.run(supervised(stack, drive_live(stack, args)))
        finally:
            stack.stop()


def report(sims: list[tuple[float, list[float]]], run: tuple[float, list[RoundRow], float]) -> None:
    """Per round: the simulation's mean over its runs and their range, the live candidate,
    the live serving version, and the gap (live serving minus the simulated mean)."""
    base, rows, final = run
    runs = np.array([h for _, h in sims])
    mean = runs.mean(axis=0)
    print(f"\nversion 1: simulated {sims[0][0]:.4f}, live through the gateway {base:.4f}")
    print(f"simulation: mean of {len(sims)} runs (mini-batch orders), [min, max]")
    print(f"{'round':>5}  {'sim':>7}  {'sim range':>15}  {'cand':>7}  {'serving':>7}  {'gap':>6}")
    serving = base
    for r in rows:
        i = r.round - 1
        cand = r.value
        if r.released.startswith("v") and r.rollout == "promoted" and cand is not None:
            serving = cand
        c = "-" if cand is None else f"{cand:.4f}"
        print(
            f"{r.round:>5}  {mean[i]:>7.4f}  [{runs[:, i].min():.4f}, {runs[:, i].max():.4f}]  "
            f"{c:>7}  {serving:>7.4f}  {100 * (serving - mean[i]):>+6.1f}  {r.released} {r.rollout}"
        )
    gap = 100 * (final - mean[-1])
    print(
        f"\nfinal: simulated {mean[-1]:.4f} (runs {runs[:, -1].min():.4f}-{runs[:, -1].max():.4f})"
        f", live through the gateway {final:.4f}, gap {gap:+.1f} points (goal >= -1.0): "
        f"{'met' if gap >= -1.0 else 'NOT met'}"
    )


def pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-edge", type=int, default=DemoPlan.per_edge)
    parser.add_argument("--alpha", type=float, default=DemoPlan.alpha)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edge", action="append", default=[], help="KEY=VALUE edge setting")
    parser.add_argument("--trainer", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--sim-runs", type=int, default=5, help="simulated runs (seeds)")
    parser.add_argument("--exposure", choices=("site", "traffic"), default="site")
    parser.add_argument("--max-steps", type=int, default=None, help="simulated local bound")
    parser.add_argument("--sim-only", action="store_true")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    args = Args(
        ns.edges,
        ns.rounds,
        ns.per_edge,
        ns.alpha,
        ns.seed,
        pairs(ns.edge),
        pairs(ns.trainer),
        ns.sim_runs,
        ns.exposure,
        max_steps=ns.max_steps,
    )
    began = time.perf_counter()
    sims = [simulate(args, run) for run in range(args.sim_runs)]
    for k, (_, history) in enumerate(sims):
        print(f"simulation run {k}: {[round(a, 4) for a in history]}", flush=True)
    finals = [h[-1] for _, h in sims]
    print(f"simulated final: mean {np.mean(finals):.4f}, {min(finals):.4f}-{max(finals):.4f}")
    if not ns.sim_only:
        report(sims, live(args))
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
