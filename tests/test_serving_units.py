"""Following the served version, hand-checked, no servers: which version a rollback
sends the rounds back to, the lineage it is judged by, and what a rebase does to a book."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.artifact import sign_version_dir
from fedcore.envelope_header import UpdateHeader
from fedcore.errors import EnvelopeError
from trainer.driver import AsyncTarget, RoundDriver
from trainer.errors import TrainerError, UpdateRejected
from trainer.ingest import AcceptedUpdate
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.serving_watch import Rebase, ServingWatch, Settled, follow_target, lineage
from trainer.strategies import get_strategy

PARENTS = {1: None, 2: 1, 3: 2, 4: 3, 5: 2}
"""4 descends from 3; 5 was released after a rebase from 3 back to 2."""


def chain(version: int) -> list[int]:
    out: list[int] = []
    current: int | None = version
    while current is not None:
        out.append(current)
        current = PARENTS[current]
    return out


@pytest.mark.parametrize(
    ("version", "newest", "stable", "dropped", "expected"),
    [
        (3, 3, 2, 3, 2),  # version 3's canary failed: back to 2
        (4, 4, 2, 3, 2),  # 4 was built on 3 while 3's canary ran: back to 2
        (3, 3, 1, 3, 1),  # version 1 promoted by hand over 3: back to 1
        (5, 5, 2, 3, None),  # already rebased, 5 is built on 2: its rollout may be waiting
        (3, 3, 2, 1, None),  # 2 was promoted over 1; 3 not handed to the gateway yet
        (3, 3, 2, None, None),  # the rollout's record is unreadable: change nothing
        (3, 3, 3, 2, None),  # the fleet serves the base
        (2, 4, 4, 2, 4),  # 4 promoted after a rebase to 2: follow it forward
        (2, 4, 6, 2, None),  # a version this trainer never released
    ],
)
def test_follow_target(
    version: int, newest: int, stable: int, dropped: int | None, expected: int | None
) -> None:
    assert follow_target(version, newest, Settled(stable, "r-1", dropped), chain) == expected


KEY = ed25519.Ed25519PrivateKey.generate()


def write_manifests(model_dir: Path, parents: dict[int, int | None]) -> None:
    for version, parent in parents.items():
        (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
        sign_version_dir(model_dir / str(version), KEY, model=model_dir.name, version=version,
                         parent_version=parent)  # fmt: skip


def test_lineage_follows_the_manifests_parents(tmp_path: Path) -> None:
    write_manifests(tmp_path, PARENTS)
    trusted = KEY.public_key()
    assert lineage(tmp_path, 4, trusted) == [4, 3, 2, 1]
    assert lineage(tmp_path, 5, trusted) == [5, 2, 1]
    assert lineage(tmp_path, 9, trusted) == [9]  # no manifest: the version alone
    write_manifests(tmp_path, {7: 8, 8: 7})  # a loop ends
    assert lineage(tmp_path, 7, trusted) == [7, 8]
    doc = {"manifest": {"version": 6, "parent_version": 2}}  # unsigned: the walk ends
    (tmp_path / "6").mkdir()
    (tmp_path / "6" / "manifest.json").write_text(json.dumps(doc))
    write_manifests(tmp_path, {10: 6})
    assert lineage(tmp_path, 10, trusted) == [10, 6]


def book() -> RoundBook:
    return RoundBook(
        "digits",
        RoundPolicy(min_updates=1),
        get_strategy("fedadam"),
        version=3,
        digest="33" * 32,
        params=np.full(3, 3.0, np.float32),
        seed=1,
    )


def test_rebase_abandons_the_round_resets_the_optimiser_and_keeps_the_number() -> None:
    b = book()
    b.open(["edge-1"], now=0.0)
    b.fold(Contribution("a" * 32, "edge-1", 10, 3, 0.0), np.ones(3, np.float32))
    b.release(4, "44" * 32, b.finalize())  # FedAdam now carries moments
    assert b.strategy.server_state() and b.newest == 4
    before = b.reference
    opened = b.open(["edge-1"], now=1.0)
    b.fold(Contribution("b" * 32, "edge-1", 10, 4, 0.0), np.ones(3, np.float32))
    abandoned = b.rebase(2, "22" * 32, np.full(3, 2.0, np.float32))
    assert abandoned is not None and abandoned.announcement == opened
    assert b.current is None and b.reference == before  # the dropped round sets no medians
    assert b.strategy.server_state() == {} and b.step_scale == 0.5
    assert (b.version, b.newest) == (2, 4)
    a = b.open(["edge-1"], now=2.0)
    assert (a.base_version, a.base_digest) == (2, "22" * 32)
    assert not b.accepts_base(4) and not b.accepts_base(3) and b.accepts_base(2)
    with pytest.raises(TrainerError, match="never released"):
        b.rebase(5, "55" * 32, np.zeros(3, np.float32))


def header(base: int, digest: str, edge: str = "edge-1") -> UpdateHeader:
    return UpdateHeader(
        suite="x25519-hkdf-sha256-chacha20poly1305-ed25519",
        model="digits",
        round=1,
        edge_id=edge,
        base_version=base,
        base_digest=digest,
        update_id="c" * 32,
        payload_len=12,
        chunk_size=16,
        chunk_count=1,
        compression="none",
        num_samples=5,
    )


async def test_async_rounds_after_a_rebase_take_its_ancestors_not_the_dropped(
    tmp_path: Path,
) -> None:
    """Async (``max_staleness`` 2): after rebasing from 4 (built on 3) to 2, updates
    based on 2 or 1 count, those based on 3 or 4 (the dropped line) are refused."""
    artifacts = tmp_path / "artifacts"
    write_manifests(artifacts / "digits", {1: None, 2: 1, 3: 2, 4: 3})
    b = RoundBook(
        "digits",
        RoundPolicy(mode="async", min_updates=1, max_staleness=2),
        get_strategy("fedavg"),
        version=4,
        digest="44" * 32,
        params=np.full(3, 4.0, np.float32),
        history={v: f"{v}{v}" * 32 for v in (1, 2, 3)},
    )
    driver = RoundDriver({"digits": b}, tmp_path / "state", {"digits": (3,)})
    watch = ServingWatch(None, driver, artifacts, KEY.public_key())  # type: ignore[arg-type]
    watch.ready["digits"] = Rebase("digits", 4, 2, "22" * 32, np.full(3, 2.0), "r-3", 3)
    assert await watch.apply("digits")
    b.open([], now=0.0)
    target = driver.target("digits")
    assert isinstance(target, AsyncTarget) and target.base_version == 2
    target.check(header(2, "22" * 32))
    target.check(header(1, "11" * 32))
    for base in (3, 4):
        with pytest.raises(EnvelopeError, match="stale-round"):
            target.check(header(base, f"{base}{base}" * 32))
    # checked before the rebase, folded after: refused, not folded
    with pytest.raises(UpdateRejected, match="stale-round"):
        driver.fold(AcceptedUpdate(header(3, "33" * 32), np.ones(3, np.float32), "e" * 64, 7))
    assert b.current is not None and b.current.count() == 0
