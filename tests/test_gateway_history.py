"""The gateway's view of rounds and lineage, read from real NATS KV buckets."""

from __future__ import annotations

import nats

from fedcore.kv import kv_bucket
from fedcore.wire import (
    LINEAGE_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
    Contributor,
    Lineage,
    RoundAnnouncement,
    RoundRecord,
    round_key,
    version_key,
)
from gateway.routes.history import HistoryReader
from tests.conftest import NatsServer


def record(r: int, outcome: str = "released") -> RoundRecord:
    return RoundRecord(
        model="digits",
        round=r,
        mode="sync",
        outcome=outcome,
        reason="ok",
        base_version=r,
        released_version=r + 1 if outcome == "released" else None,
        opened_ts=1.0,
        closed_ts=2.0,
        contributors=[Contributor(edge_id="edge-1", samples=10, base_version=r, weight=10.0)],
        accuracy=0.9,
        loss=0.3,
    )


async def test_rounds_versions_and_open_round(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    try:
        js = nc.jetstream()
        reader = HistoryReader()
        reader.bind(nc)
        assert await reader.rounds("digits", 10) == []  # no bucket yet
        assert await reader.open_round("digits") is None
        log = await kv_bucket(js, ROUND_LOG_BUCKET)
        for r in (1, 2, 3, 10):
            await log.put(
                round_key("digits", r), record(r, "held" if r == 2 else "released").encode()
            )
        await log.put(round_key("other", 1), record(1).encode())
        await log.put("digits.00000004", b"not json")  # skipped, not fatal
        rounds = await reader.rounds("digits", 10)
        assert [r.round for r in rounds] == [1, 2, 3, 10]  # zero-padded keys sort by round
        assert rounds[1].outcome == "held"
        assert [r.round for r in await reader.rounds("digits", 2)] == [3, 10]
        lineage = await kv_bucket(js, LINEAGE_BUCKET)
        await lineage.put(
            version_key("digits", 2),
            Lineage(
                model="digits",
                version=2,
                parent_version=1,
                round=1,
                digest="ab" * 32,
                strategy="fedavgm",
                created_ts=3.0,
            ).encode(),
        )
        versions = await reader.versions("digits", 10)
        assert [(v.version, v.parent_version) for v in versions] == [(2, 1)]
        rounds_kv = await kv_bucket(js, ROUNDS_BUCKET)
        announcement = RoundAnnouncement(
            model="digits",
            round=11,
            mode="sync",
            base_version=5,
            base_digest="cd" * 32,
            opened_ts=1.0,
            deadline_ts=61.0,
        )
        await rounds_kv.put("digits", announcement.encode())
        assert await reader.open_round("digits") == announcement
    finally:
        await nc.close()
