"""The central gate's margin tied to the paired standard error (issue #18 item 6: the
450-sample set's own error, about 1.7 points, was as large as the 2-point margin)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.models import get_spec
from trainer.bootstrap import train_seed_model
from trainer.evaluate import Metrics, evaluate_scores, gate, paired_standard_error
from trainer.release import ReleaseContext, _gate, record_metrics
from trainer.rounds import RoundBook, RoundPolicy
from trainer.strategies.defaults import default_strategy


def test_paired_standard_error_by_hand() -> None:
    # differences 0, 1, 0, 0: sample std 0.5, over sqrt(4)
    assert paired_standard_error(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1])) == 0.25
    assert paired_standard_error(np.ones(10), np.ones(10)) == 0.0
    assert paired_standard_error(np.ones(1), np.zeros(1)) == 0.0


def test_gate_noise_widens_the_margin_only_when_larger() -> None:
    serving = Metrics("accuracy", 0.90, 0.3, 450)
    slightly = Metrics("accuracy", 0.885, 0.3, 450)
    assert not gate(slightly, serving, margin=0.01).release
    assert gate(slightly, serving, margin=0.01, noise=0.02).release
    held = gate(Metrics("accuracy", 0.87, 0.3, 450), serving, margin=0.01, noise=0.02)
    assert not held.release and "margin 0.02)" in held.reason
    assert not gate(slightly, serving, margin=0.01, noise=0.001).release


@pytest.fixture(scope="module")
def seeded() -> tuple[NDArray[Any], Any, NDArray[Any]]:
    spec = get_spec("digits")
    assert spec.dataset is not None
    _, _, x, y = spec.dataset()
    return train_seed_model(spec, 0.1, 8, 0), x, y


def _context(x: Any, y: NDArray[Any], margin: float, z: float | None) -> ReleaseContext:
    key = ed25519.Ed25519PrivateKey.generate()
    return ReleaseContext(get_spec("digits"), key, Path("."), margin, x, y, gate_z=z)


def _book(params: NDArray[Any]) -> RoundBook:
    return RoundBook(
        "digits", RoundPolicy(), default_strategy(), version=1, digest="0" * 64, params=params
    )


def _perturbed(params: NDArray[Any], scale: float) -> NDArray[Any]:
    noise = np.random.default_rng(1).normal(0.0, scale, params.shape)
    out: NDArray[Any] = (params + noise).astype(np.float32)
    return out


def test_central_gate_pairs_the_versions_on_the_same_samples(
    seeded: tuple[NDArray[Any], Any, NDArray[Any]],
) -> None:
    """A candidate a little worse than serving, on the real digits evaluation set: the
    fixed margin 0 holds it; z = 2 paired standard errors release it, and the paired error
    is far below either version's own error on 450 samples."""
    serving, x, y = seeded
    candidate = _perturbed(serving, 0.03)
    spec = get_spec("digits")
    cand_m, cand_s = evaluate_scores(spec, candidate, x, y)
    serv_m, serv_s = evaluate_scores(spec, serving, x, y)
    drop = serv_m.value - cand_m.value
    assert 0 < drop < 0.02  # a small regression, inside the old 2-point demo margin
    fixed = _gate(_context(x, y, 0.0, None), _book(serving), candidate)
    assert not fixed.release
    tied = _gate(_context(x, y, 0.0, 2.0), _book(serving), candidate)
    assert tied.release and tied.paired_se is not None
    own = np.sqrt(serv_m.value * (1 - serv_m.value) / len(y))
    assert 0 < tied.paired_se < own / 2
    assert tied.paired_se == pytest.approx(np.std(cand_s - serv_s, ddof=1) / np.sqrt(len(y)))
    assert record_metrics(tied)["paired_se"] == tied.paired_se


def test_central_gate_still_holds_a_clear_regression(
    seeded: tuple[NDArray[Any], Any, NDArray[Any]],
) -> None:
    serving, x, y = seeded
    candidate = _perturbed(serving, 0.3)
    decision = _gate(_context(x, y, 0.0, 2.0), _book(serving), candidate)
    assert decision.candidate is not None and decision.serving is not None
    assert decision.serving.value - decision.candidate.value > 2 * (decision.paired_se or 0)
    assert not decision.release
    ctx = replace(_context(x, y, 0.0, None), margin=1.0)
    assert _gate(ctx, _book(serving), candidate).release  # the fixed margin alone decides


def test_demo_table_shows_the_change_against_serving_with_its_paired_error() -> None:
    from fedgate.demo import RoundRow, table

    rows = [
        RoundRow(1, "1,2,3", 410, 0.8489, 0.5, None, "v2", "promoted", 0.8289, 0.0071),
        RoundRow(2, "1,2,3", None, 0.86, 0.46, None, "v3", "promoted", 0.85, None),
        RoundRow(3, "1,2,3", 400, None, None, None, "failed"),
    ]
    header, _rule, paired, unpaired, failed = table(rows)
    assert "vs serving" in header
    assert "+2.0 ± 0.7" in paired
    assert paired.split()[4] == "+2.0" and "±" not in unpaired
    assert unpaired.split()[4] == "+1.0"
    assert failed.split()[3:5] == ["-", "-"]
