"""A held candidate leaves no trace in the server optimiser's state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.models import get_spec
from trainer.bootstrap import train_seed_model
from trainer.release import ReleaseContext, _release_or_hold
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy


def test_held_round_restores_momentum(tmp_path: Path) -> None:
    spec = get_spec("digits")
    params = train_seed_model(spec, fraction=0.2, epochs=3, seed=0)  # serving is decent
    _, _, x, y = spec.dataset()
    ctx = ReleaseContext(spec, ed25519.Ed25519PrivateKey.generate(), tmp_path, 0.0, x, y)
    strategy = get_strategy("fedavgm", eta=2.0, momentum=0.7)
    book = RoundBook(
        "digits", RoundPolicy(min_updates=1), strategy, version=1, digest="ab" * 32, params=params
    )
    book.open(["edge-1"], now=0.0)
    book.fold(
        Contribution("a" * 32, "edge-1", 10, 1, 0.0), np.full(params.size, 5.0, np.float32)
    )  # a wrecking update
    held = asyncio.run(
        _release_or_hold(ctx, book, None, [], 1, lambda outcome, reason, **kw: (outcome, reason))
    )  # type: ignore[arg-type]
    assert held[0] == "held"
    assert strategy.server_state() == {} or all(
        not np.any(v) for v in strategy.server_state().values()
    )
    assert book.current is None and book.version == 1
    assert book.step_scale == 0.5  # the next candidate takes half the server step


def test_the_step_shrinks_after_each_hold_and_grows_back_after_a_release() -> None:
    params = np.zeros(4, np.float32)
    book = RoundBook(
        "digits",
        RoundPolicy(min_updates=1),
        get_strategy("fedavgm", eta=2.0, momentum=0.0),
        version=1,
        digest="ab" * 32,
        params=params,
    )

    def candidate() -> np.ndarray:
        book.open(["edge-1"], now=0.0)
        book.fold(Contribution("a" * 32, "edge-1", 10, 1, 0.0), np.ones(4, np.float32))
        return book.finalize()

    np.testing.assert_allclose(candidate(), 2.0)  # eta * delta
    book.hold()
    assert book.step_scale == 0.5
    for scale in (0.25, 0.125, 0.125):  # down to 1/8
        candidate()
        book.hold()
        assert book.step_scale == scale
    np.testing.assert_allclose(candidate(), 0.25)
    book.release(2, "cd" * 32, params)
    assert book.step_scale == 0.25
    for v in range(3, 6):
        candidate()
        book.release(v, "cd" * 32, params)
    assert book.step_scale == 1.0


def _hold_one(book: RoundBook) -> None:
    book.open(["edge-1"], now=0.0)
    book.fold(Contribution("a" * 32, "edge-1", 10, 1, 0.0), np.ones(2, np.float32))
    book.finalize()
    book.hold()


def test_step_backoff_one_turns_it_off_and_a_checkpoint_keeps_the_scale(tmp_path: Path) -> None:
    from trainer import checkpoint

    policy = RoundPolicy(min_updates=1, step_backoff=1.0)
    book = RoundBook(
        "digits", policy, get_strategy("fedavg"), version=1, digest="ab" * 32, params=np.zeros(2)
    )
    _hold_one(book)
    assert book.step_scale == 1.0
    halving = RoundBook(
        "digits",
        RoundPolicy(min_updates=1),
        get_strategy("fedavg"),
        version=1,
        digest="ab" * 32,
        params=np.zeros(2, np.float32),
    )
    _hold_one(halving)
    checkpoint.save(tmp_path, halving)
    restored = checkpoint.load(tmp_path)
    assert restored is not None and restored.step_scale == 0.5
    fresh = RoundBook(
        "digits",
        RoundPolicy(min_updates=1),
        get_strategy("fedavg"),
        version=1,
        digest="ab" * 32,
        params=np.zeros(2, np.float32),
    )
    checkpoint.resume(fresh, restored)
    assert fresh.step_scale == 0.5


def test_a_candidate_that_fails_its_export_check_is_held_and_the_trainer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A candidate the export check refuses used to raise out of close_round and stop the
    trainer, at every restart (the chaos run's crash loop). Now its round is held."""
    from fedcore.errors import ModelSpecError

    spec = get_spec("digits")
    params = train_seed_model(spec, fraction=0.05, epochs=1, seed=0)
    _, _, x, y = spec.dataset()
    ctx = ReleaseContext(spec, ed25519.Ed25519PrivateKey.generate(), tmp_path, 1.0, x, y)
    book = RoundBook(
        "digits", RoundPolicy(min_updates=1), get_strategy("fedavg"), version=1,
        digest="ab" * 32, params=params,
    )  # fmt: skip
    book.open(["edge-1"], now=0.0)
    book.fold(Contribution("a" * 32, "edge-1", 10, 1, 0.0), np.full(params.size, 1e-4, np.float32))

    def refused(*_: object, **__: object) -> None:
        (tmp_path / "digits" / "2").mkdir(parents=True)  # what an export leaves behind
        raise ModelSpecError("digits: ONNX Runtime differs from torch by 1.1e-05 > 1e-05")

    monkeypatch.setattr("trainer.release.write_version", refused)
    outcome, reason = asyncio.run(
        _release_or_hold(ctx, book, None, [], 1, lambda outcome, reason, **kw: (outcome, reason))
    )  # type: ignore[arg-type]
    assert outcome == "held" and reason.startswith("export failed: digits: ONNX Runtime")
    assert book.current is None and book.version == 1
    assert not (tmp_path / "digits" / "2").exists()
    book.open(["edge-1"], now=1.0)  # the next round opens from version 1
    assert book.current is not None and book.current.announcement.base_version == 1
