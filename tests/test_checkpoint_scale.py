"""The per-update checkpoint of a round must not cost more as the round grows (issue #17,
item 4: with 1,000 edges, re-encoding every contribution on every save made a round
O(N^2)), and must still hold exactly what the round folded."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer import checkpoint
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy

DIM = 8


def book() -> RoundBook:
    b = RoundBook(
        "digits",
        RoundPolicy(min_updates=1),
        get_strategy("fedavg"),
        version=1,
        digest="ab" * 32,
        params=np.zeros(DIM, np.float32),
    )
    b.open([])
    return b


def fold(b: RoundBook, i: int) -> None:
    c = Contribution(f"u{i:04d}", f"edge-{i}", 40 + i % 7, 1, 0.0, {"loss": 0.5})
    b.fold(c, np.full(DIM, 0.01 * (1 + i % 3), np.float32))


def test_each_contribution_is_encoded_once_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[str] = []

    def counting(c: Any) -> dict[str, Any]:
        encoded.append(c.update_id)
        return asdict(c)

    monkeypatch.setattr(checkpoint, "asdict", counting)
    b = book()
    for i in range(200):
        fold(b, i)
        checkpoint.save(tmp_path, b)
    # before: every save encoded the whole round, 200 saves -> 17,000+ encodings
    assert len(encoded) <= 2 * 200


def test_the_checkpoint_holds_the_round_as_folded(tmp_path: Path) -> None:
    b = book()
    for i in range(10):  # the first ones are held, then folded with new weights
        fold(b, i)
        checkpoint.save(tmp_path, b)
    restored = checkpoint.load(tmp_path)
    assert b.current is not None and restored is not None
    assert restored.folded == b.current.folded
    assert all(c.weight > 0 for c in restored.folded.values())
    b.abandon()
    other = book()
    for i in (97, 98, 99):
        fold(other, i)
    checkpoint.save(tmp_path, other)  # the next round's checkpoint lists only its own
    again = checkpoint.load(tmp_path)
    assert again is not None and sorted(again.folded) == ["u0097", "u0098", "u0099"]
