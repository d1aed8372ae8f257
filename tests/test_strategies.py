"""Strategies against hand-computed values, the registry, and optimiser state round trips."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedcore.modelrun import proximal_term
from trainer.aggregate import UpdateBuffer, WeightedSum
from trainer.errors import AggregationError, StrategyConfigError, UnknownStrategyError
from trainer.strategies import STRATEGIES, get_strategy, strategy_names
from trainer.strategies.base import Strategy
from trainer.strategies.clipping import NormClipping, clip_update
from trainer.strategies.defaults import (
    DEFAULT_LOCAL,
    DEFAULT_STRATEGY,
    DEFAULT_STRATEGY_OPTIONS,
    default_strategy,
)
from trainer.strategies.fedavg import FedAvg, weighted_average
from trainer.strategies.fedopt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    adam_bias_corrected_eta,
    yogi_second_moment,
)
from trainer.strategies.fedprox import FedProx
from trainer.strategies.median import Median, coordinate_median
from trainer.strategies.trimmed_mean import TrimmedMean, trimmed_mean


def f32(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def run_round(
    strategy: Strategy,
    global_params: npt.NDArray[Any],
    updates: list[tuple[npt.NDArray[Any], float]],
) -> npt.NDArray[Any]:
    state = strategy.start(global_params.size)
    for u, w in updates:
        strategy.fold(state, u, w)
    return strategy.finalize(state, global_params)


THREE = [(f32(1, 2, 3), 1.0), (f32(3, 0, -1), 2.0), (f32(0, 4, 2), 1.0)]
TEN = f32(10, 10, 10)


# --- FedAvg / FedProx ----------------------------------------------------------------


def test_weighted_average_hand_computed() -> None:
    out = weighted_average([u for u, _ in THREE], [w for _, w in THREE])
    assert out.tolist() == [1.75, 1.5, 0.75]


def test_fedavg_hand_computed() -> None:
    # weighted mean delta [1.75, 1.5, 0.75] added to the global [10, 10, 10]
    out = run_round(FedAvg(), TEN, THREE)
    assert out.dtype == np.float32
    assert out.tolist() == [11.75, 11.5, 10.75]


def test_fedavg_server_lr() -> None:
    assert run_round(FedAvg(server_lr=2.0), TEN, THREE).tolist() == [13.5, 13.0, 11.5]


def test_fedprox_aggregates_like_fedavg() -> None:
    assert run_round(FedProx(mu=0.1), TEN, THREE).tolist() == [11.75, 11.5, 10.75]
    assert FedProx(mu=0.1).options() == {"mu": 0.1, "server_lr": 1.0}


def test_proximal_term_value_and_gradient() -> None:
    local = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    term = proximal_term(local, anchor, mu=0.5)
    # 0.5 / 2 * (1 + 4 + 4) = 2.25
    assert term.item() == pytest.approx(2.25)
    term.backward()
    # d/dw = mu * (w - g)
    assert local[0].grad is not None and local[1].grad is not None
    assert local[0].grad.tolist() == [0.5, 1.0]
    assert local[1].grad.tolist() == [1.0]


def test_proximal_term_needs_pairs() -> None:
    with pytest.raises(ValueError):
        proximal_term([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.1)


# --- server optimisers ---------------------------------------------------------------


def test_fedavgm_two_rounds_hand_computed() -> None:
    strategy = FedAvgM(eta=1.0, momentum=0.5)
    x1 = run_round(strategy, f32(0, 0, 0), [(f32(1, 0, -1), 1.0)])
    assert x1.tolist() == [1.0, 0.0, -1.0]  # m = [1, 0, -1]
    x2 = run_round(strategy, x1, [(f32(1, 1, 1), 1.0)])
    # m = 0.5 * [1, 0, -1] + [1, 1, 1] = [1.5, 1, 0.5]
    assert x2.tolist() == [2.5, 1.0, -0.5]


def test_fedadam_first_step_hand_computed() -> None:
    strategy = FedAdam(eta=1.0, beta1=0.9, beta2=0.99, tau=0.1, bias_correction=False)
    out = run_round(strategy, f32(0, 0, 0), [(f32(1, -2, 0), 1.0)])
    # m = 0.1 * delta = [0.1, -0.2, 0]; v = 0.99 * 0.01 + 0.01 * delta^2
    #   = [0.0199, 0.0499, 0.0099]; step = m / (sqrt(v) + 0.1)
    np.testing.assert_allclose(out, [0.4148218, -0.6184615, 0.0], rtol=1e-6)
    assert strategy.t == 1
    assert strategy.v is not None
    np.testing.assert_allclose(strategy.v, [0.0199, 0.0499, 0.0099])


def test_fedadam_bias_correction() -> None:
    # eta_t = eta * sqrt(1 - b2^t) / (1 - b1^t): t=1 -> 0.1 / 0.1, t=2 -> sqrt(0.0199) / 0.19
    assert adam_bias_corrected_eta(1.0, 0.9, 0.99, 1) == pytest.approx(1.0)
    assert adam_bias_corrected_eta(1.0, 0.9, 0.99, 2) == pytest.approx(0.7424598)
    plain = FedAdam(eta=0.5, tau=0.1, bias_correction=False)
    corrected = FedAdam(eta=0.5, tau=0.1, bias_correction=True)
    d = [(f32(1, -2, 0), 1.0)]
    np.testing.assert_allclose(run_round(plain, TEN, d), run_round(corrected, TEN, d))


def test_yogi_second_moment_hand_computed() -> None:
    v = np.full(3, 0.01)
    delta = np.array([1.0, -2.0, 0.0])
    # sign(v - d^2) = [-1, -1, +1]: v grows by 0.01 * d^2 where d^2 > v
    np.testing.assert_allclose(yogi_second_moment(v, delta, 0.99), [0.02, 0.05, 0.01])


def test_fedyogi_first_step_hand_computed() -> None:
    out = run_round(
        FedYogi(eta=1.0, beta1=0.9, beta2=0.99, tau=0.1), f32(0, 0, 0), [(f32(1, -2, 0), 1.0)]
    )
    expected = [0.1 / (math.sqrt(0.02) + 0.1), -0.2 / (math.sqrt(0.05) + 0.1), 0.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_fedadagrad_first_step_hand_computed() -> None:
    out = run_round(FedAdagrad(eta=1.0, beta1=0.0, tau=0.1), f32(0, 0, 0), [(f32(1, -2, 0), 1.0)])
    # v = 0.01 + d^2 = [1.01, 4.01, 0.01]; m = delta
    expected = [1 / (math.sqrt(1.01) + 0.1), -2 / (math.sqrt(4.01) + 0.1), 0.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_state_round_trips_through_npz_without_pickle(name: str) -> None:
    rng = np.random.default_rng(1)
    rounds = [[(rng.standard_normal(4).astype(np.float32), 1.0)] for _ in range(3)]
    original = get_strategy(name)
    x = run_round(original, np.zeros(4, np.float32), rounds[0])
    buf = io.BytesIO()
    np.savez(buf, **original.server_state())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as saved:
        restored = get_strategy(name)
        restored.load_server_state({k: saved[k] for k in saved.files})
    for upd in rounds[1:]:
        a = run_round(original, x, upd)
        b = run_round(restored, x, upd)
        assert a.tolist() == b.tolist()
        x = a


def test_optimiser_state_size_mismatch() -> None:
    strategy = FedAdam()
    run_round(strategy, f32(0, 0, 0), [(f32(1, 1, 1), 1.0)])
    with pytest.raises(AggregationError) as err:
        run_round(strategy, f32(0, 0), [(f32(1, 1), 1.0)])
    assert err.value.reason == "wrong-size"


def test_stateless_strategy_refuses_foreign_state() -> None:
    with pytest.raises(AggregationError) as err:
        FedAvg().load_server_state({"m": np.zeros(2)})
    assert err.value.reason == "wrong-state"
    assert FedAvg().server_state() == {}


# --- robust rules ---------------------------------------------------------------------


def test_coordinate_median_hand_computed() -> None:
    odd = np.array([[1, 5, 3], [2, 2, 2], [9, -1, 0]], dtype=np.float32)
    assert coordinate_median(odd).tolist() == [2.0, 2.0, 2.0]
    even = np.vstack([odd, [[4, 4, 4]]]).astype(np.float32)
    assert coordinate_median(even).tolist() == [3.0, 3.0, 2.5]


def test_median_strategy_ignores_weights_and_outliers() -> None:
    updates = [(f32(1, 5, 3), 1.0), (f32(2, 2, 2), 1.0), (f32(9, -1, 0), 1000.0)]
    assert run_round(Median(), TEN, updates).tolist() == [12.0, 12.0, 12.0]


def test_trimmed_mean_hand_computed() -> None:
    rows = np.array([[1, 10], [2, 20], [3, 30], [4, 40], [100, -100]], dtype=np.float32)
    # beta 0.2 of 5 -> drop 1 per side: col0 mean(2,3,4) = 3, col1 mean(10,20,30) = 20
    assert trimmed_mean(rows, 0.2).tolist() == [3.0, 20.0]
    # beta 0.1 of 5 -> floor(0.5) = 0 dropped: plain mean
    assert trimmed_mean(rows, 0.1).tolist() == [22.0, 0.0]


def test_trimmed_mean_strategy_across_column_blocks() -> None:
    strategy = TrimmedMean(beta=0.2)
    state = strategy.start(2)
    for row in ([1, 10], [2, 20], [3, 30], [4, 40], [100, -100]):
        strategy.fold(state, f32(*row), 1.0)
    assert strategy.finalize(state, f32(0, 0)).tolist() == [3.0, 20.0]


def test_trimmed_mean_small_rounds() -> None:
    strategy = TrimmedMean(beta=0.4)
    for values, expected in (([1, 2, 3, 4, 5], 3.0), ([1, 2, 3, 4], 2.5), ([7], 7.0)):
        # floor(0.4 n) per side: 2 of 5 (keeps 3), 1 of 4 (keeps 2, 3), 0 of 1
        state = strategy.start(1)
        for v in values:
            strategy.fold(state, f32(v), 1.0)
        assert strategy.finalize(state, f32(0)).tolist() == [expected]
    with pytest.raises(ValueError, match="leaves none"):
        trimmed_mean(np.zeros((2, 1), dtype=np.float32), 0.5)


def test_robust_rules_are_bounded_buffers() -> None:
    for strategy in (Median(capacity=3), TrimmedMean(capacity=3)):
        assert strategy.streams is False
        state = strategy.start(4)
        assert isinstance(state, UpdateBuffer)
        assert state.capacity == 3


# --- clipping -------------------------------------------------------------------------


def test_clip_update() -> None:
    np.testing.assert_allclose(clip_update(f32(3, 4), 1.0), [0.6, 0.8])
    np.testing.assert_allclose(clip_update(f32(0.3, 0.4), 1.0), [0.3, 0.4], rtol=1e-6)


def test_norm_clipping_hand_computed() -> None:
    # [3,4] (norm 5) -> [0.6, 0.8]; [0.3, 0.4] (norm 0.5) kept; equal weights
    out = run_round(NormClipping(max_norm=1.0), f32(0, 0), [(f32(3, 4), 1.0), (f32(0.3, 0.4), 1.0)])
    np.testing.assert_allclose(out, [0.45, 0.6], rtol=1e-6)


# --- round errors ---------------------------------------------------------------------


def test_empty_round_cannot_finalise() -> None:
    strategy = FedAvg()
    with pytest.raises(AggregationError) as err:
        strategy.finalize(strategy.start(3), TEN)
    assert err.value.reason == "empty-round"


def test_wrong_state_and_size() -> None:
    with pytest.raises(AggregationError) as err:
        FedAvg().finalize(UpdateBuffer(3, 2), TEN)
    assert err.value.reason == "wrong-state"
    with pytest.raises(AggregationError) as err:
        Median().fold(WeightedSum(3), f32(1, 2, 3), 1.0)
    assert err.value.reason == "wrong-state"
    state = FedAvg().start(3)
    FedAvg().fold(state, f32(1, 2, 3), 1.0)
    with pytest.raises(AggregationError) as err:
        FedAvg().finalize(state, f32(1, 2))
    assert err.value.reason == "wrong-size"


# --- registry and defaults ------------------------------------------------------------


def test_registry_names() -> None:
    assert strategy_names() == (
        "clipping",
        "dp_fedavg",
        "fedadagrad",
        "fedadam",
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedyogi",
        "krum",
        "median",
        "trimmed_mean",
    )
    for name, cls in STRATEGIES.items():
        assert cls.name == name  # type: ignore[attr-defined]


def test_get_strategy_normalises_names_and_passes_options() -> None:
    s = get_strategy("Trimmed-Mean", beta=0.25)
    assert isinstance(s, TrimmedMean)
    assert s.options()["beta"] == 0.25
    assert isinstance(get_strategy(" FedAdam ", eta=0.05), FedAdam)


def test_get_strategy_unknown_name() -> None:
    with pytest.raises(UnknownStrategyError) as err:
        get_strategy("bulyan")
    assert err.value.reason == "unknown-strategy"
    assert err.value.name == "bulyan"
    assert "krum" in err.value.known
    assert "no strategy named 'bulyan'" in str(err.value)


def test_get_strategy_bad_options() -> None:
    with pytest.raises(StrategyConfigError) as err:
        get_strategy("fedavg", lr=1.0)
    assert (err.value.strategy, err.value.option) == ("fedavg", "lr")
    assert "server_lr" in err.value.detail
    with pytest.raises(StrategyConfigError) as err:
        get_strategy("clipping")
    assert err.value.option == "max_norm"
    with pytest.raises(StrategyConfigError) as err:
        get_strategy("trimmed_mean", beta=0.5)
    assert err.value.option == "beta"
    with pytest.raises(StrategyConfigError) as err:
        get_strategy("fedadam", eta=-1)
    assert err.value.option == "eta"
    with pytest.raises(StrategyConfigError) as err:
        get_strategy("median", capacity=0)
    assert err.value.option == "capacity"


def test_streaming_strategies_declare_it() -> None:
    streaming = {n for n, cls in STRATEGIES.items() if cls.streams}  # type: ignore[attr-defined]
    assert streaming == {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "clipping",
        "dp_fedavg",
    }


def test_defaults() -> None:
    s = default_strategy()
    assert s.name == DEFAULT_STRATEGY
    assert s.options() == DEFAULT_STRATEGY_OPTIONS
    assert DEFAULT_LOCAL.epochs >= 1 and DEFAULT_LOCAL.batch_size >= 1


def test_default_recipe_learns_digits_in_a_few_rounds() -> None:
    """Smoke test of the recipe end to end: 4 rounds over 3 edges."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only add contention
    try:
        accuracy = _default_recipe_accuracy(rounds=4)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.85


def _default_recipe_accuracy(rounds: int) -> float:
    from fedcore.models.digits import DIGITS, train_test_split_digits
    from fedcore.params import flatten, load_flat

    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = train_test_split_digits()
    edges = [np.arange(k, len(y_tr), 3) for k in range(3)]
    module = DIGITS.build_module()
    params = flatten(module)
    strategy = default_strategy()
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(rounds):
        state = strategy.start(params.size)
        for idx in edges:
            load_flat(module, params)
            opt = torch.optim.SGD(
                module.parameters(), lr=DEFAULT_LOCAL.lr, momentum=DEFAULT_LOCAL.momentum
            )
            x, y = torch.from_numpy(x_tr[idx]), torch.from_numpy(y_tr[idx])
            for start in range(0, len(idx), DEFAULT_LOCAL.batch_size):
                sl = slice(start, start + DEFAULT_LOCAL.batch_size)
                opt.zero_grad()
                loss_fn(module(x[sl]), y[sl]).backward()
                opt.step()
            strategy.fold(state, flatten(module) - params, float(len(idx)))
        params = strategy.finalize(state, params)
    load_flat(module, params)
    with torch.no_grad():
        pred = module(torch.from_numpy(x_te)).argmax(dim=1).numpy()
    return float((pred == y_te).mean())
