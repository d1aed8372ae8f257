"""A round ends in one call on its book: ``hold()`` or ``release(...)``.

Each changes the step scale, the strategy's server state and the digest history together;
the staleness rule is one function that the book and the ingest-side target both use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedcore.envelope import UpdateHeader
from fedcore.errors import EnvelopeError
from fedcore.wire import within_staleness
from trainer.driver import AsyncTarget, RoundDriver
from trainer.errors import TrainerError
from trainer.rounds import MIN_STEP_SCALE, Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy

DIM = 6
V1 = hashlib.sha256(b"v1").hexdigest()
V2 = hashlib.sha256(b"v2").hexdigest()


def _book(mode: str = "sync", strategy: str = "fedadam") -> RoundBook:
    return RoundBook(
        "digits",
        RoundPolicy(mode=mode, min_updates=1, max_staleness=2),  # type: ignore[arg-type]
        get_strategy(strategy, eta=0.5),
        version=1,
        digest=V1,
        params=np.zeros(DIM, np.float32),
    )


def _round(book: RoundBook, tag: int) -> np.ndarray:
    """Open a round, fold one update, return its candidate."""
    book.open(["edge-1"], now=float(tag))
    delta = np.full(DIM, 0.1 * (tag + 1), np.float32)
    book.fold(Contribution(f"{tag:032x}", "edge-1", 10, book.version, 0.0), delta)
    return book.finalize()


def _state(book: RoundBook) -> dict[str, object]:
    server = {k: v.tolist() for k, v in book.strategy.server_state().items()}
    return {
        "version": book.version,
        "digest": book.digest,
        "params": np.asarray(book.params).tolist(),
        "step_scale": book.step_scale,
        "history": dict(book.history),
        "server": server,
        "current": book.current,
        "reference": [c.update_id for c in book.reference],
    }


def _old_hold(book: RoundBook) -> None:
    """What trainer/release.py did before: snapshot, finalize, restore, after_hold, abandon."""
    before = {k: v.copy() for k, v in book.strategy.server_state().items()}
    book.open(["edge-1"], now=0.0)
    book.fold(Contribution(f"{0:032x}", "edge-1", 10, 1, 0.0), np.full(DIM, 0.1, np.float32))
    book.finalize()
    book.strategy.load_server_state(before)
    book.step_scale = max(MIN_STEP_SCALE, book.step_scale * book.policy.step_backoff)
    book.abandon()


def test_hold_puts_the_server_state_back_and_shrinks_the_step_in_one_call() -> None:
    book = _book()
    book.release(2, V2, _round(book, 0))  # the optimiser has moments now
    moments = book.strategy.server_state()
    assert moments and all(np.any(v) for k, v in moments.items() if k != "t")
    _round(book, 1)
    assert not np.array_equal(book.strategy.server_state()["m"], moments["m"])  # stepped
    book.hold()
    after = book.strategy.server_state()
    assert all(np.array_equal(after[k], moments[k]) for k in moments)
    assert book.step_scale == 0.5 and book.current is None
    assert (book.version, book.digest, book.history) == (2, V2, {1: V1, 2: V2})


def test_release_sets_the_base_grows_the_step_and_records_the_digest() -> None:
    book = _book()
    _round(book, 0)
    book.hold()
    candidate = _round(book, 1)
    stepped = book.strategy.server_state()
    book.release(2, V2, candidate)
    assert (book.version, book.digest) == (2, V2) and book.params is candidate
    assert book.history == {1: V1, 2: V2}
    assert book.step_scale == 1.0 and book.current is None
    after = book.strategy.server_state()
    assert all(np.array_equal(after[k], stepped[k]) for k in stepped)  # the step stays
    assert [c.update_id for c in book.reference] == [f"{1:032x}"]


def test_hold_then_release_leaves_the_state_the_old_call_sequence_left() -> None:
    new, old = _book(), _book()
    _round(new, 0)
    new.hold()
    _old_hold(old)
    assert _state(new) == _state(old)
    candidate_new, candidate_old = _round(new, 1), _round(old, 1)
    np.testing.assert_array_equal(candidate_new, candidate_old)  # both at half a step
    new.release(2, V2, candidate_new)
    # before: advance(version, digest, params), after_release(), and the service put the
    # digest into the driver's history
    old.version, old.digest, old.params = 2, V2, candidate_old
    old.history[2] = V2
    old.step_scale = min(1.0, old.step_scale / old.policy.step_backoff)
    old._close()  # what advance() did after setting the base
    assert _state(new) == _state(old)


def test_hold_and_release_need_an_open_round() -> None:
    book = _book()
    with pytest.raises(TrainerError, match="no round is open"):
        book.hold()
    with pytest.raises(TrainerError, match="no round is open"):
        book.release(2, V2, np.zeros(DIM, np.float32))
    assert (book.step_scale, book.version, book.history) == (1.0, 1, {1: V1})


def test_a_failed_round_keeps_the_step() -> None:
    book = _book()
    book.open(["edge-1"], now=0.0)
    book.abandon()
    assert book.step_scale == 1.0 and book.history == {1: V1} and book.current is None


def _header(base_version: int, digest: str, round_: int = 3) -> UpdateHeader:
    return UpdateHeader(
        suite="x25519-hkdf-sha256-aes256gcm",
        model="digits",
        round=round_,
        edge_id="edge-1",
        base_version=base_version,
        base_digest=digest,
        compression="none",
        num_samples=10,
        update_id="0" * 32,
        payload_len=4 * DIM,
        chunk_size=65536,
        chunk_count=1,
    )


@pytest.mark.parametrize("lag", [-1, 0, 1, 2, 3])
def test_the_book_and_the_async_target_apply_one_staleness_rule(lag: int) -> None:
    target = AsyncTarget(
        "digits", 3, 5, "5" * 64, (DIM,), max_staleness=2,
        digests=tuple((v, str(v) * 64) for v in range(1, 7)),
    )  # fmt: skip
    book = _book(mode="async")
    book.version = 5
    allowed = within_staleness(5, 5 - lag, 2)
    assert allowed == (0 <= lag <= 2)
    assert book.accepts_base(5 - lag) == allowed
    if allowed:
        target.check(_header(5 - lag, str(5 - lag) * 64))
    else:
        with pytest.raises(EnvelopeError) as err:
            target.check(_header(5 - lag, str(5 - lag) * 64))
        assert err.value.reason == "stale-round"
    sync = _book()
    sync.version = 5
    assert sync.accepts_base(5 - lag) == (lag == 0)


def test_the_async_target_takes_its_digests_from_the_book_history(tmp_path: Path) -> None:
    book = _book(mode="async")
    driver = RoundDriver({"digits": book}, tmp_path, {"digits": (DIM,)})
    book.release(2, V2, _round(book, 0))
    book.open(["edge-1"], now=1.0)
    target = driver.target("digits")
    assert isinstance(target, AsyncTarget) and dict(target.digests) == {1: V1, 2: V2}
    target.check(_header(1, V1, book.current.round if book.current else 0))
    with pytest.raises(EnvelopeError) as err:
        target.check(_header(1, V2, book.current.round if book.current else 0))
    assert err.value.reason == "base-mismatch"
