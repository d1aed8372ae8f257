"""A hostile edge's object metadata cannot stall or widen the trainer's update ingest.

Every edge may write metadata for any name in the updates bucket (the deployment's
permissions, ``fedgate.nats_accounts``; the server here runs with them). The trainer reads
the chunks of the one metadata it checked, refuses links, bad metadata and missing chunks
as ``object-unreadable`` (terminated, not retried for ever), bounds the read by the
pointer, binds the pointer's name to the subject's edge, and leaves no subscription behind.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from fedcore.keys import load_ed25519, load_x25519
from fedcore.subjects import inbox_prefix
from fedcore.transport import (
    MSG_ID_HEADER,
    UPDATES_OBJECT_BUCKET,
    StreamSpec,
    UpdatePointer,
    update_object_name,
    update_subject,
)
from fedgate.keys_cmd import init_keys
from tests.conftest import start_nats
from tests.transport_harness import DIM, Keys, Rounds, SumAggregator, seal
from trainer.bus import ensure_transport
from trainer.ingest import Disposition, IngestOptions, Outcome, UpdateIngestor
from trainer.ingest_metrics import IngestMetrics
from trainer.ledger import UpdateLedger
from trainer.registry import RegistryFile

B = UPDATES_OBJECT_BUCKET
MIB = 1024 * 1024
OPTIONS = IngestOptions(
    max_update_bytes=MIB, ack_wait_s=30.0, fetch_timeout_s=0.5, object_timeout_s=20.0
)


@dataclass
class Scene:
    trainer: NATS
    edges: dict[str, NATS]
    keys: Keys
    ingestor: UpdateIngestor
    metrics: CollectorRegistry

    def rejected(self, reason: str) -> float:
        sample = "fedgate_trainer_updates_rejected_total"
        return self.metrics.get_sample_value(sample, {"reason": reason}) or 0.0

    async def write_meta(self, edge: str, name: str, body: bytes) -> None:
        """Metadata for ``name`` as ``edge`` may write it (its permissions allow it)."""
        subject = f"$O.{B}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        await self.edges[edge].jetstream().publish(subject, body, headers={"Nats-Rollup": "sub"})

    async def put(self, edge: str, name: str, data: bytes) -> None:
        store = await self.edges[edge].jetstream().object_store(B)
        await store.put(name, data)

    async def point(self, edge: str, pointer: UpdatePointer, msg_id: str) -> None:
        """Publish ``pointer`` on ``edge``'s update subject."""
        subject = update_subject("digits", edge)
        js = self.edges[edge].jetstream()
        await js.publish(subject, pointer.encode(), headers={MSG_ID_HEADER: msg_id})

    async def poll_all(self, expected: int, within_s: float = 60.0) -> list[Outcome]:
        out: list[Outcome] = []
        deadline = time.monotonic() + within_s
        while len(out) < expected and time.monotonic() < deadline:
            out += await self.ingestor.poll(batch=expected - len(out))
        return out


@asynccontextmanager
async def scene(root: Path, options: IngestOptions = OPTIONS) -> AsyncIterator[Scene]:
    server = start_nats(root / "nats", ["trainer", "edge-1", "edge-2"], roles=True)
    conns: dict[str, NATS] = {}
    try:
        for user in ["trainer", "edge-1", "edge-2"]:
            conns[user] = await nats.connect(
                server.url,
                user=user,
                password=server.users[user],
                inbox_prefix=inbox_prefix(user),
                allow_reconnect=False,
            )
        layout = init_keys(root / "keys", ["edge-1", "edge-2"])
        keys = Keys(
            layout,
            load_x25519(layout.hpke_key),
            {e: load_ed25519(layout.edge_key(e)) for e in ("edge-1", "edge-2")},
        )
        js = conns["trainer"].jetstream()
        await ensure_transport(js, StreamSpec(max_msg_size=conns["trainer"].max_payload))
        metrics = CollectorRegistry()
        ingestor = UpdateIngestor(
            js,
            recipient=keys.trainer,
            edges=RegistryFile(layout.registry),
            rounds=Rounds(),
            aggregator=SumAggregator(),
            ledger=await UpdateLedger.open(js),
            metrics=IngestMetrics(metrics),
            options=options,
        )
        await ingestor.bind()
        edges = {e: conns[e] for e in ("edge-1", "edge-2")}
        yield Scene(conns["trainer"], edges, keys, ingestor, metrics)
    finally:
        for nc in conns.values():
            await nc.close()
        server.process.stop()


def name(edge: str, tag: str) -> str:
    return update_object_name("digits", edge, (tag * 32)[:32])


def meta(obj: str, **fields: object) -> bytes:
    """Object metadata as an edge could write it: a 1000-byte object unless ``fields``."""
    digest = "SHA-256=" + base64.urlsafe_b64encode(bytes(32)).decode()
    body = {"name": obj, "bucket": B, "nuid": "X", "size": 1000, "chunks": 1, "digest": digest}
    return json.dumps(body | fields).encode()


def pointer(obj: str, size: int = 1000) -> UpdatePointer:
    return UpdatePointer(bucket=B, name=obj, sha256="0" * 64, size=size)


async def good_via_object(s: Scene, edge: str) -> str:
    """A valid sealed update of ``edge`` stored as an object, its pointer published."""
    payload = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    update_id, envelope = seal(s.keys, payload, edge=edge)
    obj = update_object_name("digits", edge, update_id)
    await s.put(edge, obj, envelope)
    await s.point(edge, UpdatePointer.for_envelope(envelope, B, obj), update_id)
    return update_id


@pytest.mark.timeout(90)  # the old code did not finish in 150 s
async def test_a_link_is_refused_without_reading_its_target(tmp_path: Path) -> None:
    """Failed before: nats-py's get() followed the edge's link (to a 16 MiB object here,
    bypassing the pointer's 1000-byte bound) and answered ``bad-pointer``; the self-link
    recursed (RecursionError: retried for ever)."""
    async with scene(tmp_path) as s:
        big = name("edge-1", "b")
        await s.put("edge-1", big, b"\x01" * (16 * MIB))
        link, loop = name("edge-1", "a"), name("edge-1", "c")
        for obj, target in [(link, big), (loop, loop)]:
            linked = meta(obj, options={"link": {"bucket": B, "name": target}})
            await s.write_meta("edge-1", obj, linked)
        await s.point("edge-1", pointer(link), "l1")
        await s.point("edge-1", pointer(loop), "l2")
        before = s.trainer.stats["in_bytes"]
        started = time.monotonic()
        outcomes = await s.poll_all(2)
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.REJECTED, "object-unreadable")
        ] * 2
        assert time.monotonic() - started < 10  # generous: the machine is shared
        assert s.trainer.stats["in_bytes"] - before < MIB  # the 16 MiB target never came
        assert s.rejected("object-unreadable") == 2


async def test_a_pointer_to_another_edges_object_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    """Failed before: the object of edge-2 was read for edge-1's message (and only the
    signature check after it said no, as ``subject-mismatch``)."""
    async with scene(tmp_path) as s:
        payload = np.zeros(DIM, np.float32)
        update_id, envelope = seal(s.keys, payload, edge="edge-2")
        obj = update_object_name("digits", "edge-2", update_id)
        await s.put("edge-2", obj, envelope)
        await s.point("edge-1", UpdatePointer.for_envelope(envelope, B, obj), "x1")
        outcomes = await s.poll_all(1)
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.REJECTED, "bad-pointer")
        ]


async def test_bad_metadata_and_missing_chunks_are_terminated_and_others_go_on(
    tmp_path: Path,
) -> None:
    """Failed before: both were transient (TimeoutError after object_timeout_s, and
    BadObjectMetaError): nak, redelivered for ever, each holding up the ingest."""
    async with scene(tmp_path) as s:
        garbage, hollow, flood = name("edge-1", "d"), name("edge-1", "e"), name("edge-1", "f")
        await s.write_meta("edge-1", garbage, b"not json")
        await s.write_meta("edge-1", hollow, meta(hollow, nuid="NOCHUNKS"))
        # many empty chunks: more than a 1000-byte object can have
        js = s.edges["edge-1"].jetstream()
        for _ in range(5):
            await js.publish(f"$O.{B}.C.EMPTY", b"")
        await s.write_meta("edge-1", flood, meta(flood, nuid="EMPTY", chunks=5))
        for i, obj in enumerate([garbage, hollow, flood]):
            await s.point("edge-1", pointer(obj), f"g{i}")
        good = await good_via_object(s, "edge-2")
        started = time.monotonic()
        outcomes = await s.poll_all(4)
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.REJECTED, "object-unreadable")
        ] * 3 + [(Disposition.ACCEPTED, None)]
        assert outcomes[-1].update_id == good
        assert time.monotonic() - started < 10  # not one object_timeout_s (20 s) waited
        assert s.rejected("object-unreadable") == 3
        assert await s.ingestor.poll(timeout_s=1.5) == []  # terminated, not redelivered


async def test_refusals_mid_read_leave_no_subscription(tmp_path: Path) -> None:
    """Failed before: when the bounded sink refused the object's excess, nats-py's get()
    never unsubscribed its ordered consumer, whose chunks kept coming into the trainer."""
    async with scene(tmp_path) as s:
        subs = len(s.trainer._subs)
        for k in range(3):
            obj = name("edge-1", str(k))
            await s.put("edge-1", obj, bytes([k]) * (2 * MIB))
            store = await s.edges["edge-1"].jetstream().object_store(B)
            info = await store.get_info(obj)
            real = {"nuid": info.nuid, "chunks": info.chunks, "digest": info.digest}
            await s.write_meta("edge-1", obj, meta(obj, size=300_000, **real))
            await s.point("edge-1", pointer(obj, 300_000), f"o{k}")
        outcomes = await s.poll_all(3)
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.REJECTED, "bad-pointer")
        ] * 3
        await asyncio.sleep(1.0)
        assert len(s.trainer._subs) == subs
        assert sum(sub.pending_bytes for sub in s.trainer._subs.values()) == 0


async def test_a_stalled_read_is_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    """Failed before (no bound): a read that ran out of time was retried for ever."""
    options = IngestOptions(
        max_update_bytes=MIB,
        ack_wait_s=30.0,
        fetch_timeout_s=0.5,
        object_timeout_s=1e-6,  # every read stalls
        object_attempts=2,
        retry_delay_s=0.1,
    )
    async with scene(tmp_path, options) as s:
        await good_via_object(s, "edge-1")
        outcomes = await s.poll_all(2)
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.RETRY, "transient"),
            (Disposition.REJECTED, "object-unreadable"),
        ]
        assert await s.ingestor.poll(timeout_s=1.0) == []


def test_the_digest_helper_is_strict() -> None:
    from trainer.opener import _digest

    raw = hashlib.sha256(b"x").digest()
    assert _digest("SHA-256=" + base64.urlsafe_b64encode(raw).decode()) == raw
    for bad in [None, 5, "", "SHA-256=", "SHA-256=!!", "MD5=" + base64.b64encode(raw).decode()]:
        assert _digest(bad) is None
