"""Sync against buffered async rounds with one edge 5x slower than the others.

Digits (scikit-learn, fixed split) is spread over 5 edges with a Dirichlet(0.3) label
skew. Each edge trains locally for real (``benchmarks.fl_quality.train_local``: one epoch,
SGD lr 0.05, momentum 0.9, batch 32) and the trainer's own ``RoundBook`` folds and
finalises with the default strategy and bounds. What is simulated is time: one local run
takes 1 time unit on a fast edge (jittered by up to 20%) and 5 units on the slow one;
aggregation, transport and release take no time.

- sync: each round invites every edge and closes when all five are in, so it lasts as
  long as the slow edge (the default deployment with MIN_UPDATES = edges);
- async: a buffer closes with ``BUFFER`` updates, or at its timeout with ``MIN_UPDATES``;
  every edge trains from the newest version, sends when done (an update stale by at most
  ``MAX_STALENESS`` versions joins the buffer open then, weighted
  ``(1 + staleness) ** -0.5``; a second update of an edge waits for the next buffer) and
  starts again from the newest version.

It prints, per seed, the simulated time until test accuracy first reaches each target
(``--targets``, default 0.80 0.85 0.90) in each mode and their ratio (above 1: async
got there sooner), and the accuracy each mode has at the end of the time budget.
Run: ``.venv/bin/python benchmarks/async_stragglers.py`` (3-4 minutes per seed on 2
busy cores).
"""

from __future__ import annotations

import argparse
import heapq
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fl_quality import accuracy, dirichlet_split, initial_params, train_local
from fedcore.models.digits import DIGITS, train_test_split_digits
from fedcore.params import flatten, load_flat
from trainer.errors import UpdateRejected
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy
from trainer.strategies.defaults import DEFAULT_LOCAL

EDGES, ALPHA = 5, 0.3
SPEEDS = (1.0, 1.0, 1.0, 1.0, 5.0)
"""Time units per local run: the last edge is 5x slower."""
BUFFER, MIN_UPDATES, TIMEOUT, MAX_STALENESS = 3, 2, 2.0, 6
HORIZON = 100.0
STRATEGY = "fedavg"
"""Both modes; fedavgm (the default) with its server momentum diverged in async mode
(accuracy 0.10 at the end, seed 0), where a version comes every third of a time unit."""
"""Simulated time budget of each run."""

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Trace:
    points: list[tuple[float, float]]  # (time, test accuracy) after each release

    def first(self, target: float) -> float | None:
        return next((t for t, acc in self.points if acc >= target), None)

    def last(self) -> float:
        return self.points[-1][1] if self.points else float("nan")


class Fleet:
    """The edges' data and a module to train them with; local runs are real."""

    def __init__(self, data: Data, parts: list[npt.NDArray[Any]], seed: int) -> None:
        self.data, self.parts, self.seed = data, parts, seed
        self.module = DIGITS.build_module()
        self.runs = 0

    def train(self, edge: int, params: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        x_tr, y_tr, _, _ = self.data
        idx = self.parts[edge]
        load_flat(self.module, params)
        self.runs += 1
        train_local(
            self.module, x_tr[idx], y_tr[idx], DEFAULT_LOCAL, self.seed * 100_000 + self.runs
        )
        return (flatten(self.module) - params).astype(np.float32)

    def score(self, params: npt.NDArray[Any]) -> float:
        _, _, x_te, y_te = self.data
        load_flat(self.module, params)
        return accuracy(self.module, x_te, y_te)


def book(policy: RoundPolicy, seed: int) -> RoundBook:
    return RoundBook(
        "digits",
        policy,
        get_strategy(STRATEGY),
        version=1,
        digest="0" * 64,
        params=initial_params(seed),
    )


def run_sync(fleet: Fleet, seed: int, rng: np.random.Generator) -> Trace:
    b = book(RoundPolicy(min_updates=EDGES, step_backoff=1.0), seed)
    t, points = 0.0, []
    while t < HORIZON:
        b.open([f"edge-{e}" for e in range(EDGES)], now=t)
        took = 0.0
        for e in range(EDGES):
            took = max(took, SPEEDS[e] * (1 + 0.2 * rng.random()))
            delta = fleet.train(e, b.params)
            uid = f"{b.next_round:016x}{e:016x}"
            b.fold(Contribution(uid, f"edge-{e}", len(fleet.parts[e]), b.version, 0.0), delta)
        t += took
        b.release(b.version + 1, "0" * 64, b.finalize())
        points.append((t, fleet.score(b.params)))
    return Trace(points)


@dataclass(order=True)
class Arrival:
    t: float
    edge: int
    base: int
    delta: npt.NDArray[np.float32] = None  # type: ignore[assignment]


def run_async(fleet: Fleet, seed: int, rng: np.random.Generator) -> Trace:
    policy = RoundPolicy(
        mode="async",
        buffer_size=BUFFER,
        min_updates=MIN_UPDATES,
        deadline_s=TIMEOUT,
        max_staleness=MAX_STALENESS,
        step_backoff=1.0,
    )
    b = book(policy, seed)
    versions: dict[int, npt.NDArray[Any]] = {1: b.params}
    queue: list[tuple[float, int, int]] = []  # (arrival time, edge, base version)
    deltas: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
    points: list[tuple[float, float]] = []
    waiting: list[tuple[int, int]] = []  # (edge, base): a second update for the buffer

    def start(edge: int, t: float) -> None:
        deltas[(edge, b.version)] = fleet.train(edge, b.params)
        heapq.heappush(queue, (t + SPEEDS[edge] * (1 + 0.2 * rng.random()), edge, b.version))

    def fold(edge: int, base: int, n: int) -> bool:
        if b.version - base > MAX_STALENESS:
            return False  # refused as too stale; the edge starts again
        c = Contribution(f"{n:032x}", f"edge-{edge}", len(fleet.parts[edge]), base, 0.0)
        try:
            b.fold(c, deltas[(edge, base)])
        except UpdateRejected:  # this edge is in the buffer already: the next one takes it
            waiting.append((edge, base))
        return True

    def close(t: float) -> None:
        b.release(b.version + 1, "0" * 64, b.finalize())
        versions[b.version] = b.params
        points.append((t, fleet.score(b.params)))
        b.open([], now=t)
        held, waiting[:] = list(waiting), []
        for edge, base in held:
            fold(edge, base, len(points) * 1000 + edge)

    b.open([], now=0.0)
    for e in range(EDGES):
        start(e, 0.0)
    n = 0
    while queue and queue[0][0] < HORIZON:
        a = b.current.announcement if b.current else None
        t, edge, base = heapq.heappop(queue)
        if a is not None and a.deadline_ts <= t and b.next_step(now=a.deadline_ts) == "close":
            close(a.deadline_ts)
        n += 1
        fold(edge, base, n)
        if b.next_step(now=t) == "close":
            close(t)
        start(edge, t)
    return Trace(points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.80, 0.85, 0.90])
    args = parser.parse_args()
    x_tr, y_tr, x_te, y_te = train_test_split_digits()
    data = (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te).long(),
    )
    print(
        f"digits, {EDGES} edges, Dirichlet({ALPHA}); local run 1 time unit, the slow edge 5; "
        f"async buffer {BUFFER}, min {MIN_UPDATES}, timeout {TIMEOUT}, "
        f"staleness <= {MAX_STALENESS}; {STRATEGY}; budget {HORIZON:.0f} units"
    )
    print("time units to reach each test accuracy (sync / async = ratio), accuracy at the end")
    ratios: dict[float, list[float]] = {t: [] for t in args.targets}
    for seed in args.seeds:
        torch.manual_seed(seed)
        parts = dirichlet_split(data[1].numpy(), EDGES, ALPHA, seed)
        sync = run_sync(Fleet(data, parts, seed), seed, np.random.default_rng(seed))
        asyn = run_async(Fleet(data, parts, seed), seed, np.random.default_rng(seed))
        cells = []
        for target in args.targets:
            ts, ta = sync.first(target), asyn.first(target)
            ratio = ts / ta if ts is not None and ta is not None else None
            if ratio is not None:
                ratios[target].append(ratio)
            f = "-" if ratio is None else f"{ratio:.2f}x"
            cells.append(f"{target}: {_t(ts)} / {_t(ta)} = {f}")
        print(f"seed {seed}: " + "; ".join(cells))
        print(f"        end: sync {sync.last():.3f}, async {asyn.last():.3f}")
    for target, values in ratios.items():
        if values:
            print(f"mean sync/async time to {target}: {float(np.mean(values)):.2f}x")


def _t(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
