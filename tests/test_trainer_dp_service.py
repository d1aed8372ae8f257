"""Central DP as the trainer service configures it: a per-model ledger, epsilon in the
round record, and no round opens once the budget is spent."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import ConfigError
from trainer.books import build_strategy
from trainer.errors import PrivacyBudgetExceeded, StrategyConfigError
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.settings import TrainerSettings
from trainer.strategies import get_strategy

DP_OPTIONS = {"clip_norm": 1.0, "noise_multiplier": 4.0}


def settings(tmp_path: Path, **extra: object) -> TrainerSettings:
    return TrainerSettings(
        nats_user="trainer",
        nats_password_file=tmp_path / "p",
        data_dir=tmp_path,
        signing_key_file=tmp_path / "s.key",
        hpke_private_key_file=tmp_path / "h.key",
        edge_registry_file=tmp_path / "r.json",
        **({"strategy": "dp_fedavg", "strategy_options": DP_OPTIONS} | extra),  # type: ignore[arg-type]
    )


def test_dp_needs_a_budget(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DP_EPSILON_BUDGET"):
        build_strategy(settings(tmp_path), "digits")


def test_epsilon_is_recorded_and_the_budget_stops_rounds(tmp_path: Path) -> None:
    strategy = build_strategy(settings(tmp_path, dp_epsilon_budget=3.0), "digits")
    book = RoundBook(
        "digits",
        RoundPolicy(min_updates=1),
        strategy,
        version=1,
        digest="ab" * 32,
        params=np.zeros(4, np.float32),
    )
    assert book.strategy.epsilon_spent() == 0.0
    spent = []
    with pytest.raises(PrivacyBudgetExceeded):
        for r in range(100):
            book.open(["edge-1"], now=float(r))
            book.fold(Contribution(f"{r:032x}", "edge-1", 10, 1, 0.0), np.ones(4, np.float32))
            book.release(book.version + 1, "ab" * 32, book.finalize())
            spent.append(book.strategy.epsilon_spent())
    assert len(spent) >= 2 and all(b > a for a, b in itertools.pairwise(spent))
    assert spent[-1] <= 3.0
    assert (tmp_path / "state" / "privacy-ledger.json").exists()


def test_a_sample_rate_below_one_is_refused_the_cohort_is_not_poisson(tmp_path: Path) -> None:
    """Finding 10 of #16: the accountant's amplification by sampling assumes each edge takes
    part independently with probability q (Poisson) and that nobody learns the choice
    beforehand, but the trainer invites a fixed-size cohort it announces. A sample rate
    below 1 is therefore refused instead of under-counting epsilon."""
    options = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1}
    with pytest.raises(StrategyConfigError, match="Poisson") as err:
        build_strategy(
            settings(tmp_path, dp_epsilon_budget=1000.0, strategy_options=options), "digits"
        )
    assert err.value.option == "sample_rate"
    with pytest.raises(StrategyConfigError, match="sample_rate"):
        get_strategy("dp_fedavg", clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5)


def test_epsilon_of_sampled_rounds_is_the_no_amplification_figure(tmp_path: Path) -> None:
    """z = 1, 100 rounds, a tenth of the fleet invited each round: 96.1 is charged (no
    amplification applies), not the 7.97 a Poisson sample rate of 0.1 would give."""
    strategy = build_strategy(
        settings(
            tmp_path,
            dp_epsilon_budget=1000.0,
            sample_fraction=0.1,
            strategy_options={"clip_norm": 1.0, "noise_multiplier": 1.0},
        ),
        "digits",
    )
    book = RoundBook(
        "digits",
        RoundPolicy(min_updates=1, sample_fraction=0.1),
        strategy,
        version=1,
        digest="ab" * 32,
        params=np.zeros(4, np.float32),
    )
    fleet = [f"edge-{i}" for i in range(20)]
    for r in range(100):
        invited = book.open(fleet, now=float(r)).sampled
        assert invited is not None and len(invited) == 2
        book.fold(Contribution(f"{r:032x}", invited[0], 10, 1, 0.0), np.ones(4, np.float32))
        book.release(book.version + 1, "ab" * 32, book.finalize())
    assert book.strategy.epsilon_spent() == pytest.approx(96.1, abs=0.05)
