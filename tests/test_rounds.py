"""Round bookkeeping and checkpoints, hand-checked, no servers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer import checkpoint
from trainer.errors import TrainerError, UpdateRejected
from trainer.rounds import Contribution, RoundBook, RoundPolicy, sample_edges, staleness_weight
from trainer.strategies import get_strategy

DIGEST = "ab" * 32


def book(policy: RoundPolicy, strategy: str = "fedavg", version: int = 3) -> RoundBook:
    return RoundBook(
        "digits",
        policy,
        get_strategy(strategy),
        version=version,
        digest=DIGEST,
        params=np.zeros(3, np.float32),
        seed=1,
    )


def contrib(uid: str, edge: str, samples: int, base: int = 3) -> Contribution:
    return Contribution(uid * 32 if len(uid) == 1 else uid, edge, samples, base, 0.0, {"loss": 0.5})


def test_sync_round_closes_when_every_sampled_edge_reported() -> None:
    b = book(RoundPolicy(min_updates=2, deadline_s=60))
    a = b.open(["edge-1", "edge-2", "edge-3"], now=100.0)
    assert a.round == 1 and a.base_version == 3 and a.deadline_ts == 160.0
    assert a.sampled == ["edge-1", "edge-2", "edge-3"]
    b.fold(contrib("a", "edge-1", 10), np.array([1.0, 0.0, 0.0], np.float32))
    assert b.next_step(now=110.0) == "wait"
    b.fold(contrib("b", "edge-2", 30), np.array([0.0, 4.0, 0.0], np.float32))
    assert b.next_step(now=110.0) == "wait"  # quorum, but edge-3 may still report
    assert b.next_step(now=160.0) == "close"
    # FedAvg: (10*[1,0,0] + 30*[0,4,0]) / 40 = [0.25, 3, 0]
    np.testing.assert_allclose(b.finalize(), [0.25, 3.0, 0.0])


def test_sync_round_with_sampling_closes_early_and_fails_without_quorum() -> None:
    b = book(RoundPolicy(min_updates=2, deadline_s=10, sample_fraction=0.5))
    a = b.open(["edge-1", "edge-2", "edge-3", "edge-4"], now=0.0)
    assert a.sampled is not None and len(a.sampled) == 2
    for i, edge in enumerate(a.sampled):
        b.fold(contrib(str(i), edge, 5), np.ones(3, np.float32))
    assert b.next_step(now=1.0) == "close"
    b.abandon()
    b.open(["edge-1", "edge-2"], now=20.0)
    b.fold(contrib("z", "edge-1", 5), np.ones(3, np.float32))
    assert b.next_step(now=25.0) == "wait"
    assert b.next_step(now=31.0) == "fail"
    b.abandon()
    b.open([], now=40.0)  # no fleet known: the quorum closes it
    b.fold(contrib("y", "edge-1", 5), np.ones(3, np.float32))
    b.fold(contrib("x", "edge-2", 5), np.ones(3, np.float32))
    assert b.next_step(now=41.0) == "close"


def test_duplicate_update_ids_fold_once() -> None:
    b = book(RoundPolicy(min_updates=1))
    b.open(["edge-1"], now=0.0)
    for _ in range(3):
        b.fold(contrib("a", "edge-1", 10), np.ones(3, np.float32))
    assert b.current is not None and b.current.count() == 1
    b.fold_held()
    b.fold(contrib("a", "edge-1", 10), np.ones(3, np.float32))
    assert b.current.state.count == 1


def test_async_staleness_weighting_by_hand() -> None:
    assert staleness_weight(8, 0, 0.5) == 8.0
    assert staleness_weight(9, 3, 0.5) == 4.5  # 9 * 4**-0.5
    b = book(RoundPolicy(mode="async", buffer_size=2, max_staleness=2, min_updates=2), version=5)
    a = b.open(["edge-1", "edge-2"], now=0.0)
    assert a.mode == "async" and a.max_staleness == 2 and a.min_updates == 2
    assert (
        b.accepts_base(5) and b.accepts_base(3) and not b.accepts_base(2) and not b.accepts_base(6)
    )
    b.fold(contrib("a", "edge-1", 8, base=5), np.array([1.0, 0, 0], np.float32))  # weight 8
    assert b.next_step() == "wait"
    b.fold(
        contrib("b", "edge-2", 9, base=2), np.array([0, 1.0, 0], np.float32)
    )  # 9 * 4**-0.5 = 4.5
    assert b.next_step() == "close"
    np.testing.assert_allclose(b.finalize(), [8 / 12.5, 4.5 / 12.5, 0.0], rtol=1e-6)


def test_sampling_and_policy_validation() -> None:
    import random

    assert sample_edges([], 1.0, random.Random(0)) is None
    assert sample_edges(["b", "a"], 1.0, random.Random(0)) == ["a", "b"]
    assert len(sample_edges(list("abcdefghij"), 0.25, random.Random(0)) or []) == 3
    with pytest.raises(TrainerError):
        RoundPolicy(min_updates=0)
    with pytest.raises(TrainerError, match="no round is open"):
        book(RoundPolicy()).finalize()


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam"])
def test_checkpoint_resume_gives_the_same_result(tmp_path: Path, strategy: str) -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=3).astype(np.float32) for _ in range(4)]

    def run(interrupt: bool) -> np.ndarray:
        b = book(RoundPolicy(min_updates=1), strategy)
        b.open(["edge-1", "edge-2"], now=0.0)
        b.fold(contrib("a", "edge-1", 10), updates[0])
        b.release(4, DIGEST, b.finalize())  # one round done: optimiser state exists
        b.open(["edge-1", "edge-2"], now=1.0)
        b.fold(contrib("b", "edge-1", 10), updates[1])
        b.fold(contrib("c", "edge-2", 20), updates[2])
        if interrupt:
            checkpoint.save(tmp_path / strategy, b)
            b = book(RoundPolicy(min_updates=1), strategy)  # a fresh process
            restored = checkpoint.load(tmp_path / strategy)
            assert restored is not None
            checkpoint.resume(b, restored)
            assert b.version == 4 and b.current is not None
            # the first updates of a round are held back (trainer.bounds), so not in the
            # checkpoint: the ledger brings them back from the stream (ingest.refold)
            assert set(b.current.folded) == set() and b.current.held == {}
            b.fold(contrib("b", "edge-1", 10), updates[1])
            b.fold(contrib("c", "edge-2", 20), updates[2])
            b.fold(contrib("b", "edge-1", 10), updates[1])  # redelivered: already in
        b.fold(contrib("d", "edge-3", 5), updates[3])
        return b.finalize()

    np.testing.assert_allclose(run(True), run(False), rtol=1e-6)


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    b = book(RoundPolicy())
    checkpoint.save(tmp_path, b)
    assert checkpoint.load(tmp_path) is not None
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(TrainerError) as info:
        checkpoint.load(tmp_path)
    assert info.value.reason == "checkpoint-corrupt"


def test_one_update_per_edge_per_round_sync_and_async() -> None:
    for policy in (RoundPolicy(min_updates=3), RoundPolicy(mode="async", buffer_size=3)):
        b = book(policy)
        b.open(["edge-1", "edge-2"], now=0.0)
        b.fold(contrib("a", "edge-1", 10), np.ones(3, np.float32))
        with pytest.raises(UpdateRejected) as err:
            b.fold(contrib("b", "edge-1", 10, base=2), np.ones(3, np.float32))
        assert err.value.reason == "second-update"
        b.fold(contrib("a", "edge-1", 10), np.ones(3, np.float32))  # the same id: no change
        assert b.current is not None and b.current.count() == 1
