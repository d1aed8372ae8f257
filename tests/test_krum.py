"""Multi-Krum against hand-computed scores and selections, its bound and its settings."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedcore.errors import ConfigError
from trainer.aggregate import COLUMN_BLOCK, UpdateBuffer
from trainer.books import build_strategy
from trainer.errors import AggregationError, StrategyConfigError, UpdateRejected
from trainer.settings import TrainerSettings
from trainer.strategies import get_strategy
from trainer.strategies.krum import (
    MultiKrum,
    krum_scores,
    krum_select,
    multi_krum,
    pairwise_sq_distances,
)


def f32(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


# a=(0,0) b=(1,0) c=(0,2) d=(1,1) and an outlier e=(10,10). Squared distances:
#   a-b 1, a-c 4, a-d 2, a-e 200, b-c 5, b-d 1, b-e 181, c-d 2, c-e 164, d-e 162.
# With f=1 each score sums the n-f-2 = 2 nearest others:
#   a: 1+2 = 3, b: 1+1 = 2, c: 2+4 = 6, d: 1+2 = 3, e: 162+164 = 326.
FIVE = np.array([[0, 0], [1, 0], [0, 2], [1, 1], [10, 10]], dtype=np.float32)


def run_round(strategy: MultiKrum, rows: npt.NDArray[Any], weights: list[float]) -> Any:
    state = strategy.start(rows.shape[1])
    for row, w in zip(rows, weights, strict=True):
        strategy.fold(state, row, w)
    return strategy.finalize(state, np.zeros(rows.shape[1], dtype=np.float32))


def test_pairwise_distances_and_scores_hand_computed() -> None:
    dist = pairwise_sq_distances(FIVE)
    assert dist[0].tolist() == [0, 1, 4, 2, 200]
    assert dist[1, 2] == 5 and dist[2, 4] == 164 and dist[3, 4] == 162
    assert (dist == dist.T).all()
    assert krum_scores(dist, 1).tolist() == [3.0, 2.0, 6.0, 3.0, 326.0]


def test_selection_keeps_the_lowest_scores_ties_to_the_earlier() -> None:
    dist = pairwise_sq_distances(FIVE)
    assert krum_select(dist, 1, 1).tolist() == [1]  # Krum: b alone
    assert krum_select(dist, 1, 2).tolist() == [0, 1]  # a (3) before d (3): arrival order
    assert krum_select(dist, 1, 3).tolist() == [0, 1, 3]
    assert krum_select(dist, 1, 0).tolist() == [0, 1, 2, 3]  # n - f = 4: e is out


def test_strategy_hand_computed_and_ignores_weights() -> None:
    weights = [1.0, 1.0, 1.0, 1.0, 1e6]  # the outlier claims a huge example count
    np.testing.assert_allclose(run_round(MultiKrum(byzantine=1), FIVE, weights), [0.5, 0.75])
    np.testing.assert_allclose(run_round(MultiKrum(byzantine=1, keep=1), FIVE, weights), [1, 0])
    np.testing.assert_allclose(
        run_round(MultiKrum(byzantine=1, keep=3), FIVE, weights), [2 / 3, 1 / 3], rtol=1e-6
    )
    # with the server learning rate, from a non-zero global
    strategy = MultiKrum(byzantine=1, server_lr=2.0)
    state = strategy.start(2)
    for row in FIVE:
        strategy.fold(state, row, 1.0)
    np.testing.assert_allclose(strategy.finalize(state, f32(10, 10)), [11.0, 11.5])


def test_colluding_identical_updates_are_dropped() -> None:
    # f=2 attackers send the same far vector: each is the other's nearest neighbour, but
    # with n - f - 2 = 3 neighbours each still counts two distant honest updates
    rng = np.random.default_rng(0)
    honest = rng.normal(0.0, 0.1, (5, 8)).astype(np.float32)
    evil = np.full((2, 8), 5.0, dtype=np.float32)
    rows = np.vstack([honest[:2], evil[:1], honest[2:], evil[1:]])
    out = run_round(MultiKrum(byzantine=2), rows, [1.0] * 7)
    np.testing.assert_allclose(out, honest.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)


def brute_force_multi_krum(rows: npt.NDArray[Any], f: int, keep: int) -> Any:
    """Squared distances by explicit loops over pairs, the scores sorted by hand."""
    n = len(rows)
    x = rows.astype(np.float64)
    dist = np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        dist[i, j] = dist[j, i] = float(((x[i] - x[j]) ** 2).sum())
    scores = [sum(sorted(dist[i, k] for k in range(n) if k != i)[: n - f - 2]) for i in range(n)]
    chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:keep])
    return x[chosen].mean(axis=0)


def test_across_column_blocks_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    dim = 2 * COLUMN_BLOCK + 7
    rows = rng.normal(0.0, 1.0, (6, dim)).astype(np.float32)
    rows[4] += 0.5  # a shifted update, far from the others in every block
    expected = brute_force_multi_krum(rows, 1, 4)
    out = run_round(MultiKrum(byzantine=1, keep=4), rows, [1.0] * 6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi_krum(rows, 1, 4), expected, rtol=1e-9)


def test_bound_needs_two_f_plus_three_updates() -> None:
    strategy = MultiKrum(byzantine=1)
    assert strategy.min_round_updates == 5
    with pytest.raises(AggregationError) as err:
        run_round(strategy, FIVE[:4], [1.0] * 4)
    assert err.value.reason == "too-few-updates"
    assert "needs 5" in str(err.value)
    with pytest.raises(ValueError, match="needs n >= 7"):
        krum_scores(np.zeros((6, 6)), 2)
    with pytest.raises(AggregationError) as err:
        run_round(MultiKrum(byzantine=1, keep=6), FIVE, [1.0] * 5)
    assert err.value.reason == "too-few-updates"


def test_buffer_is_bounded_by_capacity() -> None:
    strategy = MultiKrum(byzantine=1, capacity=5)
    state = strategy.start(2)
    assert isinstance(state, UpdateBuffer) and state.capacity == 5
    assert strategy.streams is False
    for row in FIVE:
        strategy.fold(state, row, 1.0)
    with pytest.raises(UpdateRejected) as err:
        strategy.fold(state, f32(0, 0), 1.0)
    assert err.value.reason == "buffer-full"


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"byzantine": -1}, "byzantine"),
        ({"byzantine": 1.5}, "byzantine"),
        ({"byzantine": 2, "capacity": 6}, "capacity"),  # 2f + 3 = 7 could never fit
        ({"capacity": 5000}, "capacity"),
        ({"keep": 65}, "keep"),
        ({"server_lr": 0}, "server_lr"),
    ],
)
def test_bad_options(options: dict[str, Any], option: str) -> None:
    with pytest.raises(StrategyConfigError) as err:
        get_strategy("krum", **options)
    assert err.value.option == option


def test_registry_and_options() -> None:
    s = get_strategy(" KRUM ", byzantine=2, keep=3)
    assert isinstance(s, MultiKrum)
    assert s.options() == {"byzantine": 2, "keep": 3, "capacity": 64, "server_lr": 1.0}


def settings(tmp_path: Path, **values: Any) -> TrainerSettings:
    base: dict[str, Any] = {
        "nats_user": "trainer",
        "nats_password_file": tmp_path / "p",
        "data_dir": tmp_path,
        "signing_key_file": tmp_path / "s.key",
        "hpke_private_key_file": tmp_path / "h.key",
        "edge_registry_file": tmp_path / "r.json",
        "strategy": "krum",
        "strategy_options": {"byzantine": 1},
    }
    return TrainerSettings(**(base | values))


def test_trainer_refuses_a_quorum_below_the_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs 5 updates per round; FEDGATE_TRAINER_MIN_UPDATES"):
        build_strategy(settings(tmp_path, min_updates=4), "digits")
    with pytest.raises(ConfigError, match="FEDGATE_TRAINER_BUFFER_SIZE is 3"):
        build_strategy(settings(tmp_path, round_mode="async", min_updates=5), "digits")
    # an async buffer also closes at its timeout with MIN_UPDATES: that must be enough too
    with pytest.raises(ConfigError, match="FEDGATE_TRAINER_MIN_UPDATES is 2"):
        build_strategy(
            settings(tmp_path, round_mode="async", buffer_size=5, min_updates=2), "digits"
        )
    assert isinstance(build_strategy(settings(tmp_path, min_updates=5), "digits"), MultiKrum)
