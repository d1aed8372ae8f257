"""Central DP: secure Gaussian noise, DP-FedAvg by hand, the RDP accountant, the ledger."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from trainer.errors import LedgerError, PrivacyBudgetExceeded, StrategyConfigError, TrainerError
from trainer.strategies import get_strategy
from trainer.strategies.accountant import (
    DEFAULT_ORDERS,
    PrivacyLedger,
    epsilon_from_rdp,
    gaussian_epsilon,
    rdp_sampled_gaussian,
)
from trainer.strategies.dp import DPFedAvg, box_muller, gaussian_noise, uniforms_from_bytes


def f32(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def words(*values: int) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


# --- noise ----------------------------------------------------------------------------


def test_uniforms_from_bytes_hand_computed() -> None:
    u = uniforms_from_bytes(words(0, 2**63, 2**64 - 1), 3)
    # top 52 bits k -> (k + 0.5) / 2^52
    assert u.tolist() == [2**-53, 0.5 + 2**-53, 1.0 - 2**-53]
    assert u.min() > 0.0 and u.max() < 1.0


def test_uniforms_need_exact_byte_count() -> None:
    with pytest.raises(ValueError):
        uniforms_from_bytes(b"\x00" * 15, 2)


def test_box_muller_hand_computed() -> None:
    # u1 = e^-0.5 -> r = sqrt(-2 ln u1) = 1; u2 = 0.25 -> angle pi/2 -> (0, 1)
    z0, z1 = box_muller(np.array([math.exp(-0.5)]), np.array([0.25]))
    assert z0[0] == pytest.approx(0.0, abs=1e-12)
    assert z1[0] == pytest.approx(1.0)


def test_gaussian_noise_uses_the_injected_source_and_interleaves() -> None:
    calls: list[int] = []

    def source(n: int) -> bytes:
        calls.append(n)
        return words(*([2**63] * (n // 8)))

    out = gaussian_noise(3, 2.0, source)
    assert calls == [32]  # 2 pairs x 2 uniforms x 8 bytes
    r = math.sqrt(-2 * math.log(0.5 + 2**-53))
    # angle 2 pi (0.5 + tiny) = pi: (r cos, r sin) = (-r, ~0); odd n drops the last
    np.testing.assert_allclose(out, [-2 * r, 0.0, -2 * r], atol=1e-12)


def test_gaussian_noise_statistics_from_os_urandom() -> None:
    noise = gaussian_noise(400_000, 2.0)
    assert abs(noise.mean()) < 0.02  # std of the mean: 2 / sqrt(4e5) = 0.003
    assert noise.std() == pytest.approx(2.0, rel=0.01)
    assert np.mean(np.abs(noise) < 2.0) == pytest.approx(0.6827, abs=0.005)
    kurtosis = np.mean((noise / noise.std()) ** 4)
    assert kurtosis == pytest.approx(3.0, abs=0.05)


def test_gaussian_noise_is_fresh_each_call() -> None:
    assert not np.array_equal(gaussian_noise(8, 1.0), gaussian_noise(8, 1.0))
    assert gaussian_noise(0, 1.0).size == 0


def test_dp_default_noise_source_is_the_os_csprng() -> None:
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0)
    assert strategy._random_bytes is os.urandom


# --- DP-FedAvg ------------------------------------------------------------------------


def fixed_source(n: int) -> bytes:
    return words(*([2**63] * (n // 8)))


def test_dp_fedavg_hand_computed() -> None:
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=0.5, random_bytes=fixed_source)
    state = strategy.start(3)
    assert strategy.fold(state, f32(3, 4, 0), 100.0) == pytest.approx(5.0)  # -> [.6, .8, 0]
    strategy.fold(state, f32(0, 0, 0.5), 1.0)  # within the clip norm; weights ignored
    out = strategy.finalize(state, f32(1, 1, 1))
    # sum [0.6, 0.8, 0.5] + noise 0.5 * [-r, 0, -r] (r = sqrt(2 ln 2)), divided by 2
    r = math.sqrt(2 * math.log(2))
    expected = [1 + (0.6 - 0.5 * r) / 2, 1 + 0.8 / 2, 1 + (0.5 - 0.5 * r) / 2]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_dp_fedavg_fixed_denominator() -> None:
    strategy = DPFedAvg(
        clip_norm=1.0, noise_multiplier=0.5, expected_updates=4, random_bytes=fixed_source
    )
    state = strategy.start(2)
    strategy.fold(state, f32(0.5, 0.0), 1.0)
    r = math.sqrt(2 * math.log(2))
    np.testing.assert_allclose(
        strategy.finalize(state, f32(0, 0)), [(0.5 - 0.5 * r) / 4, 0.0], atol=1e-7
    )


def test_dp_fedavg_noise_std_on_the_mean() -> None:
    strategy = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5)
    assert strategy.noise_std == 3.0
    state = strategy.start(200_000)
    for _ in range(3):
        strategy.fold(state, np.zeros(200_000, dtype=np.float32), 1.0)
    out = strategy.finalize(state, np.zeros(200_000, dtype=np.float32))
    assert out.std() == pytest.approx(3.0 / 3, rel=0.02)  # noise on the sum / count


def test_dp_fedavg_options_are_validated() -> None:
    with pytest.raises(StrategyConfigError) as err:
        DPFedAvg(clip_norm=1.0, noise_multiplier=0.0)
    assert err.value.option == "noise_multiplier"
    with pytest.raises(StrategyConfigError) as err:
        DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.0)
    assert err.value.option == "sample_rate"
    with pytest.raises(StrategyConfigError) as err:
        DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, ledger=_ledger(Path("/nonexistent/x")))
    assert err.value.option == "model"
    assert isinstance(get_strategy("dp_fedavg", clip_norm=1.0, noise_multiplier=1.0), DPFedAvg)


# --- accountant -----------------------------------------------------------------------


def test_rdp_full_participation_is_alpha_over_two_sigma_squared() -> None:
    assert rdp_sampled_gaussian(1.0, 2.0, (2.0, 10.0, 1.5)).tolist() == [0.25, 1.25, 0.1875]


def test_rdp_sampled_hand_computed() -> None:
    # alpha 2, q 0.5, sigma 1: A = 0.25 + 2*0.25*e^0 + 0.25*e^1 = 0.75 + 0.25 e
    rdp = rdp_sampled_gaussian(0.5, 1.0, (2.0,))
    assert rdp[0] == pytest.approx(math.log(0.75 + 0.25 * math.e))
    assert rdp[0] == pytest.approx(0.3573740)


def test_rdp_integer_formula_matches_numerical_integration() -> None:
    # D_alpha(P||Q), P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2), on a fine grid
    q, s = 0.3, 1.3
    x = np.linspace(-40, 40, 400_001)
    pdf0 = np.exp(-(x**2) / (2 * s * s))
    pdf1 = np.exp(-((x - 1) ** 2) / (2 * s * s))
    mix = (1 - q) * pdf0 + q * pdf1
    for alpha in (2, 3, 7):
        integral = np.trapz(pdf0 * (mix / pdf0) ** alpha, x) / np.trapz(pdf0, x)
        expected = math.log(integral) / (alpha - 1)
        assert rdp_sampled_gaussian(q, s, (float(alpha),))[0] == pytest.approx(expected, rel=1e-6)


def test_epsilon_from_rdp_hand_computed() -> None:
    # eps = rdp + log((a-1)/a) - (log delta + log a) / (a - 1), a = 2
    eps, order = epsilon_from_rdp(np.array([0.25]), 1e-5, (2.0,))
    assert order == 2.0
    assert eps == pytest.approx(0.25 + math.log(0.5) - (math.log(1e-5) + math.log(2)))
    assert eps == pytest.approx(10.376631)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (2018): the tight epsilon of one Gaussian mechanism, sensitivity 1."""

    def delta_of(eps: float) -> float:
        return _phi(0.5 / sigma - eps * sigma) - math.exp(eps) * _phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "releases"), [(1.0, 1), (1.0, 10), (2.0, 50), (5.0, 100)])
def test_rdp_epsilon_is_sound_and_reasonably_tight(sigma: float, releases: int) -> None:
    # T Gaussian releases at noise sigma compose to one at sigma / sqrt(T)
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(releases), 1e-5)
    ours = gaussian_epsilon(sigma, 1.0, releases, 1e-5)
    assert exact <= ours <= 1.3 * exact


def test_epsilon_is_monotone() -> None:
    eps = [gaussian_epsilon(1.0, 0.1, t, 1e-5) for t in (1, 2, 5, 10, 100)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    by_sigma = [gaussian_epsilon(z, 0.1, 10, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_sigma == sorted(by_sigma, reverse=True)
    by_q = [gaussian_epsilon(1.0, q, 10, 1e-5) for q in (0.01, 0.1, 0.5, 1.0)]
    assert by_q == sorted(by_q)


def test_epsilon_edge_cases() -> None:
    assert gaussian_epsilon(1.0, 0.0, 10, 1e-5) == 0.0
    assert gaussian_epsilon(0.0, 1.0, 1, 1e-5) == math.inf
    assert len(DEFAULT_ORDERS) == len(rdp_sampled_gaussian(0.2, 1.0))


# --- ledger ---------------------------------------------------------------------------


def _ledger(path: Path, budget: float = 10.0) -> PrivacyLedger:
    return PrivacyLedger(path, epsilon_budget=budget, delta=1e-5)


def test_ledger_charges_persist_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "dp" / "ledger.json"
    ledger = _ledger(path)
    assert ledger.spent("digits") == 0.0
    eps1 = ledger.charge("digits", "round-1", 2.0, 1.0)
    eps2 = ledger.charge("digits", "round-2", 2.0, 1.0)
    assert 0.0 < eps1 < eps2 == pytest.approx(gaussian_epsilon(2.0, 1.0, 2, 1e-5))
    assert ledger.spent("other") == 0.0
    doc = json.loads(path.read_text())
    assert doc["format"] == "fedgate-privacy-ledger/1"
    assert [r["release_id"] for r in doc["models"]["digits"]] == ["round-1", "round-2"]
    again = _ledger(path)
    assert again.spent("digits") == pytest.approx(eps2)
    assert [r.release_id for r in again.releases("digits")] == ["round-1", "round-2"]


def test_ledger_refuses_past_the_budget_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _ledger(path, budget=8.0)
    fits = ledger.remaining_releases("digits", 2.0, 1.0)
    assert fits >= 1
    for i in range(fits):
        ledger.charge("digits", f"r{i}", 2.0, 1.0)
    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded) as err:
        ledger.charge("digits", "one-too-many", 2.0, 1.0)
    e = err.value
    assert isinstance(e, TrainerError)
    assert e.reason == "privacy-budget-exhausted"
    assert (e.model, e.budget, e.delta) == ("digits", 8.0, 1e-5)
    assert e.spent <= 8.0 < e.would_be
    assert path.read_bytes() == before
    assert len(ledger.releases("digits")) == fits
    assert ledger.remaining_releases("digits", 2.0, 1.0) == 0


def test_ledger_mixes_noise_levels(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "l.json", budget=100.0)
    ledger.charge("m", "a", 1.0, 1.0)
    ledger.charge("m", "b", 2.0, 0.5)
    rdp = rdp_sampled_gaussian(1.0, 1.0) + rdp_sampled_gaussian(0.5, 2.0)
    assert ledger.spent("m") == pytest.approx(epsilon_from_rdp(rdp, 1e-5)[0])


def test_ledger_duplicate_release(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "l.json")
    ledger.charge("digits", "r1", 2.0, 1.0)
    with pytest.raises(LedgerError) as err:
        ledger.charge("digits", "r1", 2.0, 1.0)
    assert err.value.reason == "duplicate-release"
    assert len(ledger.releases("digits")) == 1


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"format": "other", "models": {}}',
        '{"format": "fedgate-privacy-ledger/1", "models": {"m": [{"release_id": "x"}]}}',
        '{"format": "fedgate-privacy-ledger/1", "models": {"m": [{"release_id": "x",'
        ' "noise_multiplier": 1, "sample_rate": 2, "epsilon_after": 1, "at": ""}]}}',
    ],
)
def test_corrupt_ledger_is_refused_not_reset(tmp_path: Path, content: str) -> None:
    path = tmp_path / "l.json"
    path.write_text(content)
    with pytest.raises(LedgerError) as err:
        _ledger(path)
    assert err.value.reason == "ledger-corrupt"
    assert path.read_text() == content


def test_dp_training_stops_when_the_budget_is_spent(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "l.json", budget=5.0)
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=3.0, ledger=ledger, model="digits")
    params = np.zeros(4, dtype=np.float32)
    rounds = 0
    with pytest.raises(PrivacyBudgetExceeded):
        while True:
            state = strategy.start(4, round_id=f"round-{rounds}")
            strategy.fold(state, f32(0.1, 0.2, 0.3, 0.4), 10.0)
            params = strategy.finalize(state, params)
            rounds += 1
    assert ledger.remaining_releases("digits", 3.0, 1.0) == 0
    assert rounds == len(ledger.releases("digits")) >= 1
    assert ledger.releases("digits")[0].release_id == "round-0"
    assert ledger.spent("digits") <= 5.0
