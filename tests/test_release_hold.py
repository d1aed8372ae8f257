"""A held candidate leaves no trace in the server optimiser's state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
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
    ctx = ReleaseContext(spec, ed25519.Ed25519PrivateKey.generate(), tmp_path, tmp_path, 0.0, x, y)
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
