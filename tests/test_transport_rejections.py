"""Every bad update is refused with its reason, counted, terminated; the trainer goes on."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from prometheus_client import CollectorRegistry

from fedcore.transport import (
    MSG_ID_HEADER,
    UPDATES_OBJECT_BUCKET,
    UpdatePointer,
    update_object_name,
    update_subject,
)
from tests.conftest import NatsServer
from tests.transport_harness import DIM, TARGET, Bus, open_bus, seal
from trainer.driver import RoundDriver
from trainer.ingest import Disposition, IngestOptions, UpdateIngestor
from trainer.ingest_metrics import REJECTION_REASONS, IngestMetrics
from trainer.opener import RoundTarget
from trainer.registry import RegistryFile
from trainer.rounds import RoundBook, RoundPolicy
from trainer.strategies import get_strategy

LIMIT = 64 * 1024
OPTIONS = IngestOptions(max_update_bytes=LIMIT, ack_wait_s=1.0, fetch_timeout_s=0.5)


def good(seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


async def raw(bus: Bus, subject: str, data: bytes, msg_id: str) -> None:
    await bus.edge_nc.jetstream().publish(subject, data, headers={MSG_ID_HEADER: msg_id})


Case = tuple[str, Callable[[], Awaitable[object]]]


def cases(bus: Bus, t: RoundTarget) -> list[Case]:
    """(expected reason, how to send it) for round target ``t``."""
    pub = bus.publisher.publish

    def s(payload: npt.NDArray[np.float32], **fields: object) -> bytes:
        return seal(bus.keys, payload, target=t, **fields)[1]  # type: ignore[arg-type]

    nan = good()
    nan[3] = np.nan
    subject = update_subject("digits", "edge-1")
    pointer = UpdatePointer(
        UPDATES_OBJECT_BUCKET, update_object_name("digits", "edge-1", "f" * 32), "0" * 64, 10
    )
    other_trainer = x25519.X25519PrivateKey.generate().public_key()
    too_big = dataclasses.replace(pointer, size=LIMIT + 1).encode()
    return [
        ("unknown-edge", lambda: pub(s(good(), edge="edge-2"))),
        ("revoked-edge", lambda: pub(s(good(), edge="edge-3"))),
        ("bad-signature", lambda: pub(s(good(), signer=ed25519.Ed25519PrivateKey.generate()))),
        ("decrypt-failed", lambda: pub(s(good(), recipient=other_trainer))),
        ("wrong-round", lambda: pub(s(good(), round=t.round + 1))),
        ("stale-round", lambda: pub(s(good(), round=t.round - 1))),
        ("base-mismatch", lambda: pub(s(good(), base_version=t.base_version - 1))),
        ("no-open-round", lambda: pub(s(good(), model="cats"))),  # no round of cats
        ("non-finite", lambda: pub(s(nan))),
        ("decode-error", lambda: pub(s(good()[:-1]))),
        ("decode-error", lambda: pub(s(good(), compression="zstd"))),
        ("oversize", lambda: pub(s(np.zeros(LIMIT // 4, np.float32)))),
        ("oversize", lambda: raw(bus, subject, too_big, "p1")),
        ("object-missing", lambda: raw(bus, subject, pointer.encode(), "p2")),
        ("bad-pointer", lambda: raw(bus, subject, b"FGUP{not a pointer", "p3")),
        ("malformed", lambda: raw(bus, subject, b"hello", "m1")),
        ("truncated", lambda: raw(bus, subject, s(good())[:-5], "t1")),
        (
            "subject-mismatch",
            lambda: raw(bus, update_subject("digits", "edge-9"), s(good(1)), "s1"),
        ),
    ]


async def test_each_rejection_is_counted_and_the_ingestor_goes_on(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with open_bus(nats_server, tmp_path, OPTIONS) as bus:
        expected: dict[str, int] = {}
        count = len(cases(bus, TARGET))
        for i in range(count):
            # each case in a round of its own, so the good update after it is the first
            t = dataclasses.replace(TARGET, round=10 * (i + 1))
            bus.rounds.current = t
            reason, send = cases(bus, t)[i]
            await send()
            outcomes = await bus.ingestor.poll()
            assert [(o.disposition, o.reason) for o in outcomes] == [(Disposition.REJECTED, reason)]
            expected[reason] = expected.get(reason, 0) + 1
            # after each bad one, a good one still goes through
            await bus.publisher.publish(seal(bus.keys, good(i), target=t)[1])
            assert [o.disposition for o in await bus.ingestor.poll()] == [Disposition.ACCEPTED]

        for reason in REJECTION_REASONS:
            assert bus.rejected(reason) == expected.get(reason, 0), reason
        assert bus.accepted() == count
        assert await bus.ingestor.poll(timeout_s=1.5) == []  # terminated: not redelivered


async def test_second_update_and_no_open_round(nats_server: NatsServer, tmp_path: Path) -> None:
    async with open_bus(nats_server, tmp_path, OPTIONS) as bus:
        await bus.publisher.publish(seal(bus.keys, good(1))[1])
        await bus.publisher.publish(seal(bus.keys, good(2))[1])
        outcomes = await bus.ingestor.poll()
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.ACCEPTED, None),
            (Disposition.REJECTED, "second-update"),
        ]
        bus.rounds.current = None
        await bus.publisher.publish(seal(bus.keys, good(3))[1])
        outcomes = await bus.ingestor.poll()
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.REJECTED, "no-open-round")
        ]
        np.testing.assert_array_equal(bus.aggregator.total, good(1).astype(np.float64))


async def test_an_async_buffer_takes_one_update_per_edge(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Finding 9 of #16: an async round accepts updates signed for any round up to the
    open one, and the ledger's key is (model, round, edge), so edge-1's updates for rounds
    0 to 3 all went into one buffer (4 of the 3 updates it closes on). One edge, one
    update per buffer: the others are refused as ``second-update``."""
    policy = RoundPolicy(mode="async", buffer_size=3, max_staleness=2, min_updates=2)
    book = RoundBook(
        "digits",
        policy,
        get_strategy("fedavg"),
        version=TARGET.base_version,
        digest=TARGET.base_digest,
        params=np.zeros(DIM, np.float32),
        next_round=3,
    )
    book.open(["edge-1", "edge-3"], now=0.0)
    driver = RoundDriver({"digits": book}, tmp_path / "state", {"digits": TARGET.sizes})
    async with open_bus(nats_server, tmp_path, OPTIONS) as bus:
        ingestor = UpdateIngestor(
            bus.trainer_nc.jetstream(),
            recipient=bus.keys.trainer,
            edges=RegistryFile(bus.keys.layout.registry),
            rounds=driver,
            aggregator=driver,
            ledger=bus.ledger,
            metrics=IngestMetrics(CollectorRegistry()),
            options=dataclasses.replace(OPTIONS, durable="async-buffer"),
        )
        await ingestor.bind()
        for r in range(4):
            await bus.publisher.publish(seal(bus.keys, good(r), round=r)[1])
        outcomes = []
        while len(outcomes) < 4:
            outcomes += await ingestor.poll()
        assert [(o.disposition, o.reason) for o in outcomes] == [(Disposition.ACCEPTED, None)] + [
            (Disposition.REJECTED, "second-update")
        ] * 3
        assert book.current is not None and book.current.edges() == {"edge-1"}
        assert book.current.count() == 1 and book.next_step() == "wait"
