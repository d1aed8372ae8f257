"""Vectors the trainer reads from disk stay there: a held update spilled to disk (the
bounds' warm-up, :func:`trainer.rounds.spill`) is folded, and the current parameters
mapped from their ``weights.npy`` are stepped onto and checkpointed, each a slice at a
time with the slice's pages given back; the results are those of in-memory vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedcore.pages import file_pages
from fedcore.params import load_weights_file
from trainer import checkpoint
from trainer.aggregate import WeightedSum, update_norm
from trainer.rounds import RoundBook, RoundPolicy, spill
from trainer.strategies import get_strategy

DIM = 10_000_000  # 40 MB


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_folding_a_spilled_update_does_not_keep_its_pages() -> None:
    update = np.random.default_rng(1).normal(0, 1e-3, DIM).astype(np.float32)
    acc = WeightedSum(DIM)
    held = spill(update)
    del update
    before = rss_bytes()
    acc.fold(held, 3.0)
    grown = rss_bytes() - before
    # the whole mapping stayed resident before (40 MB, until the array went)
    assert grown < 0.25 * held.nbytes, f"{grown / 1e6:.1f} MB resident after the fold"


def test_a_spilled_update_folds_to_the_same_sum_and_norm() -> None:
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 1, 700_001).astype(np.float32) for _ in range(3)]
    in_memory, from_disk = WeightedSum(700_001), WeightedSum(700_001)
    for i, u in enumerate(updates):
        in_memory.fold(u, i + 1.0)
        from_disk.fold(spill(u), i + 1.0)
    assert np.array_equal(from_disk.mean(), in_memory.mean())  # the same operations
    # clipped: the factor follows the norm, summed a slice at a time in FP64 from disk
    # (more exactly than FP32's whole dot product; they differ about 1e-5 relative)
    in_memory.reset()
    from_disk.reset()
    for i, u in enumerate(updates):
        in_memory.fold(u, i + 1.0, max_norm=800.0)
        from_disk.fold(spill(u), i + 1.0, max_norm=800.0)
    np.testing.assert_allclose(from_disk.mean(), in_memory.mean(), rtol=0, atol=1e-5)
    held = spill(updates[0])
    assert file_pages(updates[0]) is None and file_pages(held) is not None
    from_pages = update_norm(held, held.size, file_pages(held))  # summed a slice at a time
    assert abs(from_pages - update_norm(updates[0], held.size)) < 1e-5 * from_pages


def test_a_spilled_update_with_non_finite_values_is_refused() -> None:
    import pytest

    from trainer.errors import UpdateRejected

    bad = np.zeros(600_000, dtype=np.float32)
    bad[599_999] = np.inf
    acc = WeightedSum(bad.size)
    with pytest.raises(UpdateRejected) as err:
        acc.fold(spill(bad), 1.0)
    assert err.value.reason == "non-finite"
    huge = np.full(600_000, 1e19, dtype=np.float32)  # its squared norm overflows FP32
    with pytest.raises(UpdateRejected):
        acc.fold(spill(huge), 1.0)
    assert acc.count == 0


def mapped_params(tmp_path: Path, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    params = np.random.default_rng(3).normal(0, 1, dim).astype(np.float32)
    np.save(tmp_path / "weights.npy", params, allow_pickle=False)
    return params, load_weights_file(tmp_path / "weights.npy", mapped=True)


def test_stepping_onto_mapped_parameters_does_not_keep_their_pages(tmp_path: Path) -> None:
    params, mapped = mapped_params(tmp_path)
    acc = WeightedSum(DIM)
    acc.fold(np.full(DIM, 1e-3, dtype=np.float32), 1.0)
    expected = acc.step_onto(params)
    del params
    before = rss_bytes()
    candidate = acc.step_onto(mapped)
    grown = rss_bytes() - before - candidate.nbytes  # the candidate itself is new memory
    assert np.array_equal(candidate, expected)
    assert grown < 0.25 * mapped.nbytes, f"{grown / 1e6:.1f} MB of parameters resident"


def test_a_checkpoint_of_mapped_parameters_does_not_keep_their_pages(tmp_path: Path) -> None:
    params, mapped = mapped_params(tmp_path)
    book = RoundBook(
        "wide", RoundPolicy(), get_strategy("fedavg"), version=1, digest="0" * 64, params=mapped
    )
    before = rss_bytes()
    checkpoint.save(tmp_path / "ckpt", book)
    grown = rss_bytes() - before
    assert grown < 0.25 * mapped.nbytes, f"{grown / 1e6:.1f} MB of parameters resident"
    restored = checkpoint.load(tmp_path / "ckpt")
    assert restored is not None and np.array_equal(restored.params, params)


def test_loading_mapped_parameters_into_a_module_keeps_neither_a_copy_nor_their_pages(
    tmp_path: Path,
) -> None:
    """The release gate scores the serving parameters in a torch module: from their mapped
    file they are copied a slice at a time (a read-only array cannot be wrapped whole)."""
    import torch

    from fedcore.params import flatten, load_flat

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(1000, 10_000), torch.nn.Linear(10_000, 4))
    params = flatten(module) + np.float32(0.5)
    np.save(tmp_path / "weights.npy", params, allow_pickle=False)
    mapped = load_weights_file(tmp_path / "weights.npy", mapped=True)
    before = rss_bytes()
    load_flat(module, mapped)
    grown = rss_bytes() - before
    assert np.array_equal(flatten(module), params)
    assert grown < 0.25 * mapped.nbytes, f"{grown / 1e6:.1f} MB resident"


def test_a_shorter_step_after_a_hold_is_computed_in_place(tmp_path: Path) -> None:
    """After a held candidate the next one is ``base + scale * (candidate - base)``:
    the same FP32 values as on whole vectors, without a step and a scaled step of the
    model's size beside the candidate (and with the base mapped, without its pages)."""
    import tracemalloc

    dim = 2_000_000
    params, mapped = mapped_params(tmp_path, dim)
    books = []
    for base in (params, mapped):
        book = RoundBook(
            "wide", RoundPolicy(), get_strategy("fedavg"), version=1, digest="0" * 64, params=base
        )
        book.step_scale = 0.35
        book.open(["edge-1"])
        book.strategy.fold(book.current.state, np.full(dim, 3e-3, dtype=np.float32), 5.0)
        books.append(book)
    full = books[0].strategy.finalize(books[0].current.state, params)
    expected = params + np.float32(0.35) * (full - params)
    tracemalloc.start()
    try:
        candidate = books[0].finalize()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(candidate, expected)
    # the candidate and step_onto's FP64 slices: 12.2 MB; whole vectors were 3 more
    assert peak < 1.75 * 4 * dim, f"{peak / 1e6:.1f} MB traced"
    before = rss_bytes()
    from_mapped = books[1].finalize()
    grown = rss_bytes() - before - from_mapped.nbytes
    assert np.array_equal(from_mapped, expected)
    assert grown < 0.25 * mapped.nbytes, f"{grown / 1e6:.1f} MB of parameters resident"
