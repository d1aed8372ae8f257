"""Streaming aggregation: validation, hand-computed sums, memory that stays flat."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from trainer.aggregate import (
    UpdateBuffer,
    WeightedSum,
    clip_factor,
    update_norm,
)
from trainer.errors import UpdateRejected
from trainer.strategies.fedavg import weighted_average


def f32(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def test_update_norm_hand_value() -> None:
    assert update_norm(f32(3, 4, 0), 3) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (f32(1, np.nan, 0), "non-finite"),
        (f32(1, np.inf, 0), "non-finite"),
        (f32(1e20, 0, 0), "non-finite"),  # squared norm overflows float32
        (np.array([1, 2, 3], dtype=np.float64), "wrong-dtype"),
        (f32(1, 2), "wrong-size"),
        (np.zeros((3, 1), dtype=np.float32), "wrong-size"),
    ],
)
def test_update_norm_rejects(update: npt.NDArray[Any], reason: str) -> None:
    with pytest.raises(UpdateRejected) as err:
        update_norm(update, 3)
    assert err.value.reason == reason


def test_clip_factor() -> None:
    assert clip_factor(5.0, 1.0) == pytest.approx(0.2)
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(5.0, None) == 1.0


def test_weighted_sum_hand_computed() -> None:
    # 1*[1,2,3] + 2*[3,0,-1] + 1*[0,4,2] = [7,6,3]; total weight 4; mean [1.75,1.5,0.75]
    acc = WeightedSum(3)
    for u, w in ((f32(1, 2, 3), 1.0), (f32(3, 0, -1), 2.0), (f32(0, 4, 2), 1.0)):
        acc.fold(u, w)
    assert acc.count == 3
    assert acc.total_weight == 4.0
    assert acc.weighted_sum().tolist() == [7.0, 6.0, 3.0]
    assert acc.mean().tolist() == [1.75, 1.5, 0.75]


def test_fold_with_max_norm_scales_but_counts_full_weight() -> None:
    acc = WeightedSum(2)
    norm = acc.fold(f32(3, 4), 2.0, max_norm=1.0)  # clipped to [0.6, 0.8]
    assert norm == pytest.approx(5.0)
    assert acc.total_weight == 2.0
    np.testing.assert_allclose(acc.weighted_sum(), [1.2, 1.6], rtol=1e-6)


def test_rejected_update_leaves_state_unchanged() -> None:
    acc = WeightedSum(3)
    acc.fold(f32(1, 1, 1), 1.0)
    for bad, weight in (
        (f32(np.nan, 0, 0), 1.0),
        (f32(1, 2), 1.0),
        (f32(1, 1, 1), 0.0),
        (f32(1, 1, 1), -3.0),
        (f32(1, 1, 1), float("nan")),
        (f32(1, 1, 1), float("inf")),
        (f32(1, 1, 1), 1e13),
    ):
        with pytest.raises(UpdateRejected) as err:
            acc.fold(bad, weight)
        assert err.value.reason in {"non-finite", "wrong-size", "bad-weight"}
    assert acc.count == 1
    assert acc.total_weight == 1.0
    assert acc.weighted_sum().tolist() == [1.0, 1.0, 1.0]


FLUSH_EVERY = 16  # the old FP32 block size: sums across many such blocks stay exact


def test_streaming_equals_batch_across_flushes() -> None:
    rng = np.random.default_rng(7)
    n = 3 * FLUSH_EVERY + 5
    updates = [rng.standard_normal(1000).astype(np.float32) for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 500, size=n)]
    acc = WeightedSum(1000)
    for u, w in zip(updates, weights, strict=True):
        acc.fold(u, w)
    np.testing.assert_allclose(acc.mean(), weighted_average(updates, weights), rtol=1e-5, atol=1e-7)


def test_integer_sum_is_exact_across_flushes() -> None:
    acc = WeightedSum(2)
    for i in range(1, 2 * FLUSH_EVERY + 4):
        acc.fold(f32(i, -i), 1.0)
    n = 2 * FLUSH_EVERY + 3
    assert acc.weighted_sum().tolist() == [n * (n + 1) / 2, -n * (n + 1) / 2]


def test_compensated_sum_keeps_what_plain_float32_loses() -> None:
    """1 + 1000 * 1e-8: each small term is below FP32's half-ulp of 1, so a plain FP32
    running sum stays 1.0; the compensated sum matches FP64 to about 1e-12."""
    acc = WeightedSum(3)
    acc.fold(f32(1, -1, 0), 1.0)
    for _ in range(1000):
        acc.fold(f32(1e-8, -1e-8, 1e-8), 1.0)
    expect = [1.0 + 1000 * float(np.float32(1e-8)), -1.0 - 1000 * float(np.float32(1e-8))]
    expect.append(1000 * float(np.float32(1e-8)))
    np.testing.assert_allclose(acc.weighted_sum(), expect, rtol=1e-12, atol=1e-15)
    assert acc.nbytes < 8 * 3 + 2 * 4 * 3 + 1  # two FP32 vectors and two scratch slices


def test_reset_reuses_buffers() -> None:
    acc = WeightedSum(2, round_id="r1")
    acc.fold(f32(1, 2), 1.0)
    acc.reset("r2")
    assert (acc.count, acc.total_weight, acc.round_id) == (0, 0.0, "r2")
    acc.fold(f32(5, 6), 2.0)
    assert acc.mean().tolist() == [5.0, 6.0]


def test_mean_of_empty_sum_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        WeightedSum(2).mean()


def _peak_while_folding(blobs: list[bytes], dim: int) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        acc = WeightedSum(dim)
        for b in blobs:
            acc.fold(np.frombuffer(b, dtype="<f4"), 3.0)
        acc.mean()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_updates() -> None:
    dim = 100_000
    rng = np.random.default_rng(0)
    blobs = [rng.standard_normal(dim).astype("<f4").tobytes() for _ in range(50)]
    peak_5 = _peak_while_folding(blobs[:5], dim)
    peak_50 = _peak_while_folding(blobs, dim)
    # 16 bytes/param of state plus the mean: ~2.4 MB either way; 45 more updates would be
    # another 18 MB if anything were kept per update.
    assert peak_50 - peak_5 < 64 * 1024
    assert peak_50 < 30 * dim


def test_weighted_sum_nbytes() -> None:
    assert WeightedSum(1000).nbytes == 16 * 1000


def test_buffer_keeps_copies_and_refuses_past_capacity() -> None:
    buf = UpdateBuffer(3, capacity=2)
    src = f32(1, 2, 3)
    buf.fold(src, 2.0)
    src[0] = 99.0  # the buffer holds a copy
    buf.fold(f32(4, 5, 6), 1.0)
    with pytest.raises(UpdateRejected) as err:
        buf.fold(f32(7, 8, 9), 1.0)
    assert err.value.reason == "buffer-full"
    assert buf.count == 2
    assert buf.weights == (2.0, 1.0)
    assert buf.total_weight == 3.0
    assert buf.nbytes == 2 * 3 * 4
    blocks = list(buf.column_blocks(block=2))
    assert [(s, e) for s, e, _ in blocks] == [(0, 2), (2, 3)]
    assert blocks[0][2].tolist() == [[1.0, 2.0], [4.0, 5.0]]
    assert blocks[1][2].tolist() == [[3.0], [6.0]]


def test_buffer_validates_like_the_sum() -> None:
    buf = UpdateBuffer(2, capacity=4)
    with pytest.raises(UpdateRejected) as err:
        buf.fold(f32(np.inf, 0), 1.0)
    assert err.value.reason == "non-finite"
    assert buf.count == 0


def test_snapshot_restore_continues_exactly() -> None:
    import io

    rng = np.random.default_rng(3)
    updates = [rng.standard_normal(50).astype(np.float32) for _ in range(FLUSH_EVERY + 7)]
    straight = WeightedSum(50)
    for u in updates:
        straight.fold(u, 2.0)
    first = WeightedSum(50)
    for u in updates[:10]:
        first.fold(u, 2.0)
    buf = io.BytesIO()
    np.savez(buf, **first.snapshot())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as saved:
        resumed = WeightedSum.restore({k: saved[k] for k in saved.files}, round_id="r")
    for u in updates[10:]:
        resumed.fold(u, 2.0)
    assert (resumed.count, resumed.total_weight, resumed.round_id) == (len(updates), 46.0, "r")
    # the compensated FP32 state is saved whole: resuming folds exactly as going straight on
    np.testing.assert_array_equal(resumed.mean(), straight.mean())


def test_restore_takes_an_older_fp64_sum() -> None:
    total = np.array([1.0 + 2.0**-40, -3.0])
    old = {"sum": total, "count": np.array([2.0]), "total_weight": np.array([2.0])}
    state = WeightedSum.restore(old)
    np.testing.assert_allclose(state.weighted_sum(), total, rtol=0, atol=1e-15)


def test_restore_refuses_bad_snapshots() -> None:
    good = WeightedSum(2).snapshot()
    with pytest.raises(ValueError):
        WeightedSum.restore({**good, "sum": np.array([np.nan, 0.0])})
    with pytest.raises(ValueError):
        WeightedSum.restore({**good, "count": np.array([-1.0])})
    with pytest.raises(KeyError):
        WeightedSum.restore({"sum": good["sum"]})


def test_a_large_update_is_scaled_a_slice_at_a_time() -> None:
    import tracemalloc

    from trainer.aggregate import SCRATCH_VALUES

    dim = 2 * SCRATCH_VALUES + 12_345  # three slices, the last one short
    rng = np.random.default_rng(5)
    updates = [rng.normal(0, 1, dim).astype(np.float32) for _ in range(3)]
    acc = WeightedSum(dim)
    assert acc.nbytes == 8 * dim + 8 * SCRATCH_VALUES  # not 12 bytes a value
    for u, w in zip(updates, [1.0, 2.0, 3.0], strict=True):
        acc.fold(u, w, max_norm=500.0)
    expected = np.zeros(dim)
    for u, w in zip(updates, [1.0, 2.0, 3.0], strict=True):
        norm = np.linalg.norm(u.astype(np.float64))
        expected += w * min(1.0, 500.0 / norm) * u.astype(np.float64)
    np.testing.assert_allclose(acc.weighted_sum(), expected, rtol=1e-6, atol=1e-5)
    tracemalloc.start()
    try:
        state = acc.snapshot()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # no copy of the 8-bytes-a-value sum for the checkpoint
    exact = state["sum"].astype(np.float64) - state["compensation"]
    np.testing.assert_array_equal(exact, acc.weighted_sum())


def test_step_onto_is_apply_step_of_the_mean_bit_for_bit() -> None:
    """The release's step is computed a slice at a time (no whole FP64 mean, twice a
    large model's size) and equals the whole-vector computation exactly."""
    from trainer.aggregate import SCRATCH_VALUES
    from trainer.strategies.base import apply_step

    dim = SCRATCH_VALUES + 1_001  # two slices
    rng = np.random.default_rng(9)
    acc = WeightedSum(dim)
    for w in (3.0, 7.0, 11.0):
        acc.fold(rng.normal(0, 1e-2, dim).astype(np.float32), w)
    base = rng.normal(0, 1, dim).astype(np.float32)
    for lr in (1.0, 0.3):
        mine = acc.step_onto(base, lr)
        assert mine.dtype == np.float32
        np.testing.assert_array_equal(mine, apply_step(base, acc.mean(), lr))
