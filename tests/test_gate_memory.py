"""What the trainer holds while the release gate scores a candidate (issue #15 item 7).

Once :meth:`RoundBook.finalize` computed the candidate, the round's running sum (2x the
model: FP32 and its Kahan compensation) is given back: the gate, export and upload never
read it, and a restart resumes the round from its checkpoint on disk. The gate scores
the candidate and the serving version in modules over their own vectors (no copy, no
random initialisation), a batch at a time, and gives the mapped serving pages back."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from trainer import checkpoint
from trainer.bounds import UpdateBounds
from trainer.errors import AggregationError
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy

DIM = 2_000_000  # 8 MB in FP32


def _book(params: np.ndarray, strategy: str = "fedavg") -> RoundBook:
    policy = RoundPolicy(min_updates=1, bounds=UpdateBounds(warmup=1))
    return RoundBook(
        "wide", policy, get_strategy(strategy), version=1, digest="0" * 64, params=params
    )


def _fold(book: RoundBook, edge: str, value: float) -> None:
    update = np.full(book.params.size, value, dtype=np.float32)
    book.fold(Contribution(f"{edge:0>32}", edge, 10, 1, 0.0), update)


def test_finalize_gives_the_round_sum_back() -> None:
    """Before: the sum stayed until the round ended, 3x the model with the candidate
    (28 MB traced for an 8 MB model); now the candidate alone."""
    params = np.zeros(DIM, dtype=np.float32)
    tracemalloc.start()
    try:
        book = _book(params)
        book.open(["edge-1", "edge-2"], now=0.0)
        _fold(book, "edge-1", 1e-3)
        _fold(book, "edge-2", 3e-3)
        candidate = book.finalize()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(candidate, 2e-3, rtol=1e-6)
    assert held < 1.25 * candidate.nbytes, f"{held / 1e6:.1f} MB held beside the candidate"
    assert book.current is not None  # the round stays open until it is released or held
    book.release(2, "1" * 64, candidate)
    assert book.current is None and book.version == 2


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "median"])
def test_a_finalized_round_resumes_from_its_checkpoint(tmp_path: Path, strategy: str) -> None:
    """A restart during the gate: the checkpoint written at the last fold, not the sum in
    memory, brings the round back, and finalizes to the same candidate bit for bit. The
    discarded state refuses a second use instead of giving a wrong candidate."""
    params = np.random.default_rng(0).normal(0, 1, 4096).astype(np.float32)
    book = _book(params, strategy)
    book.open(["edge-1", "edge-2"], now=0.0)
    _fold(book, "edge-1", 1e-3)
    _fold(book, "edge-2", -2e-3)
    checkpoint.save(tmp_path, book)  # as RoundDriver.fold does after each update
    candidate = book.finalize()
    with pytest.raises(AggregationError) as again:
        book.finalize()
    assert again.value.reason == "round-spent"
    if strategy != "median":  # a buffer is not checkpointed: its round is refolded
        with pytest.raises(AggregationError):
            checkpoint.save(tmp_path, book)
    restored = checkpoint.load(tmp_path)
    assert restored is not None
    fresh = _book(params, strategy)
    checkpoint.resume(fresh, restored)
    if strategy == "median":
        _fold(fresh, "edge-1", 1e-3)
        _fold(fresh, "edge-2", -2e-3)
    assert np.array_equal(fresh.finalize(), candidate)
    book.hold()  # a held candidate ends the round without its sum
    assert book.current is None and book.version == 1
