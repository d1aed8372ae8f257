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


def test_a_discarded_sum_goes_back_to_the_system_after_large_frees() -> None:
    """Before, the sum's buffers came from the heap: once a block of the model's size had
    been freed (an update, as every fold frees one), glibc served the sum from its heap
    and kept it in the process after the round let it go (0 of 32 MB given back)."""
    from trainer.aggregate import WeightedSum

    for _ in range(2):  # 32 MB blocks freed: glibc's mmap threshold rises to their size
        block = np.ones(8_000_000, dtype=np.float32)
        del block
    dim = 4_000_000
    acc = WeightedSum(dim)
    acc.fold(np.full(dim, 1e-3, dtype=np.float32), 1.0)
    before = _rss()[0]
    acc.discard()
    given = before - _rss()[0]
    assert given > 0.75 * 8 * dim, f"{given / 1e6:.1f} of {8 * dim / 1e6:.0f} MB given back"


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


def _rss() -> tuple[int, int]:
    """(resident, peak resident since :func:`_reset_peak`) of this process, in bytes."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(line.split()[1]) * 1024
    return found["VmRSS"], found["VmHWM"]


def _reset_peak() -> int:
    """Start a new peak (Linux: ``5`` in ``clear_refs``); the resident set now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("the peak resident set cannot be reset here")
    return _rss()[0]


def test_the_gate_scores_views_of_its_vectors_and_gives_mapped_pages_back(
    tmp_path: Path,
) -> None:
    """Before: each scoring built a randomly initialised module and copied the vector
    into it (peak +1.3x the model for the candidate), and a mapped serving vector's
    pages stayed resident after. Now the candidate's module is a view of it and the
    serving parameters' pages go back once scored; the scores are those of a module
    loaded by copy."""
    import torch

    from fedcore.models.digits import train_test_split_digits
    from fedcore.models.wide import parameter_count, wide_spec
    from fedcore.params import load_flat, load_weights_file
    from trainer.evaluate import evaluate_scores

    _, _, x, y = train_test_split_digits()
    small, spec = wide_spec(64), wide_spec(3000)  # 9.2M parameters, 37 MB
    evaluate_scores(small, np.zeros(parameter_count(64), np.float32), x, y)  # threads
    rng = np.random.default_rng(4)
    candidate = rng.normal(0, 0.02, parameter_count(3000)).astype(np.float32)
    np.save(tmp_path / "weights.npy", candidate[::-1], allow_pickle=False)
    serving = load_weights_file(tmp_path / "weights.npy", mapped=True)
    size = candidate.nbytes

    before = _reset_peak()
    cand, cand_scores = evaluate_scores(spec, candidate, x, y)
    grew = _rss()[1] - before
    assert grew < 0.5 * size, f"candidate scoring peaked {grew / size:.2f}x the model"

    before = _reset_peak()
    served, _ = evaluate_scores(spec, serving, x, y)
    kept = _rss()[0] - before
    assert kept < 0.25 * size, f"{kept / size:.2f}x the model resident after scoring"

    module = spec.build_module()
    load_flat(module, candidate)
    with torch.no_grad():
        logits = module(torch.from_numpy(x)).numpy()
    assert np.array_equal(cand_scores, (logits.argmax(1) == y).astype(np.float64))
    assert cand.samples == len(y) and 0.0 <= served.value <= 1.0
