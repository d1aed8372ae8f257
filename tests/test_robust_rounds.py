"""Each robust strategy in the real trainer process over a real nats-server: five enrolled
edges send sealed updates, one of them sign-flipped, and the released version 2 must equal
version 1 plus what the strategy gives, recomputed here from the vectors sent.

The flipped update has the honest updates' norm and a typical sample count, so the
trainer's default per-update bounds (``trainer/bounds.py``: 2x the round's median norm
and claim) leave every update as it is: what is measured is the strategy alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fedgate.keys_cmd import init_keys
from tests.conftest import NatsServer
from tests.trainer_process import (
    DIM,
    released_weights,
    send,
    trainer_and_edge,
    wait_open,
    wait_record,
)

pytestmark = pytest.mark.slow

EDGES = [f"edge-{i}" for i in range(1, 6)]
SAMPLES = np.array([10.0, 40.0, 25.0, 5.0, 20.0])
Rows = npt.NDArray[np.float64]


def median(rows: Rows) -> Rows:
    # n = 5: the third value of each sorted column
    return np.sort(rows, axis=0)[2]


def trimmed_mean_02(rows: Rows) -> Rows:
    # beta 0.2 of 5 -> floor(1.0) = 1 dropped at each end: the mean of the middle three
    return np.sort(rows, axis=0)[1:4].mean(axis=0)


def clipped_mean_005(rows: Rows) -> Rows:
    # each update scaled to L2 norm <= 0.05 (all five are about 0.07), then the
    # sample-weighted mean
    norms = np.sqrt((rows * rows).sum(axis=1))
    scale = np.minimum(1.0, 0.05 / norms)
    return (SAMPLES[:, None] * scale[:, None] * rows).sum(axis=0) / SAMPLES.sum()


def multi_krum_f1(rows: Rows) -> Rows:
    # score: squared distances to the n - f - 2 = 2 nearest others; keep n - f = 4
    n = len(rows)
    dist = np.array([[((rows[i] - rows[j]) ** 2).sum() for j in range(n)] for i in range(n)])
    scores = [sorted(np.delete(dist[i], i))[:2] for i in range(n)]
    kept = sorted(range(n), key=lambda i: (sum(scores[i]), i))[:4]
    return rows[sorted(kept)].mean(axis=0)


CASES: list[tuple[str, dict[str, object], Callable[[Rows], Rows]]] = [
    ("median", {}, median),
    ("trimmed_mean", {"beta": 0.2}, trimmed_mean_02),
    ("clipping", {"max_norm": 0.05}, clipped_mean_005),
    ("krum", {"byzantine": 1}, multi_krum_f1),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("strategy", "options", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_robust_strategy_in_the_trainer_process(
    tmp_path: Path,
    nats_server: NatsServer,
    strategy: str,
    options: dict[str, object],
    expected: Callable[[Rows], Rows],
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    rng = np.random.default_rng(7)
    mu = np.full(DIM, 1e-3)  # the honest direction; norms about 0.07
    honest = (mu + rng.normal(0.0, 2e-4, (4, DIM))).astype(np.float32)
    flipped = -(mu + rng.normal(0.0, 2e-4, (1, DIM))).astype(np.float32)
    deltas = np.vstack([honest[:2], flipped, honest[2:]])  # the attacker arrives third
    settings = {
        "STRATEGY": strategy,
        "STRATEGY_OPTIONS": json.dumps(options),
        "MIN_UPDATES": str(len(EDGES)),
    }
    async with trainer_and_edge(tmp_path, keys, nats_server, **settings) as (trainer, nc):
        js = nc.jetstream()
        a1 = await wait_open(js, 1, trainer)
        for edge, delta, samples in zip(EDGES, deltas, SAMPLES, strict=True):
            await send(nc, keys, edge, a1, delta, int(samples))
        record = await wait_record(js, 1, trainer)
        assert record.outcome == "released", record
        assert record.released_version == 2
        assert sorted(c.edge_id for c in record.contributors) == EDGES
    v1, v2 = released_weights(tmp_path, 1), released_weights(tmp_path, 2)
    want = v1.astype(np.float64) + expected(deltas.astype(np.float64))
    np.testing.assert_allclose(v2, want, rtol=0, atol=2e-7)
    step = (v2 - v1).astype(np.float64)
    if strategy == "clipping":  # a mean of vectors of norm <= 0.05 has norm <= 0.05
        assert np.linalg.norm(step) <= 0.05 * (1 + 1e-5)
    else:  # the flip is voted or scored out: the step stays with the honest direction
        # (plain weighted FedAvg would give 0.5 mu: 75% honest weight minus 25% flipped)
        assert step.mean() > 0.85e-3
