"""The trainer's memory while it ingests updates of a large model does not grow with the
number of updates: its own ingestor and round driver (verify, decrypt, decode, bounds,
fold, checkpoint) over a real nats-server, every update through the object store, peak
allocations traced with ``tracemalloc`` (numpy reports its buffers to it). Two updates and
eight must peak alike; the update in flight is in memory once (opened in place in the
buffer it was read into), the candidate of ``finalize`` comes on top; the running sum
(allocated when the round opens, before tracing) is 2x the model, the bounds' warm-up
waits on disk."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from prometheus_client import CollectorRegistry

from edge_runtime.publisher import UpdatePublisher
from fedcore.compression import CompressionSettings, encode_update
from fedcore.enrollment import EdgeRegistry
from fedcore.envelope import seal_update
from fedcore.transport import StreamSpec
from tests.conftest import NatsServer
from trainer.bus import ensure_transport
from trainer.driver import RoundDriver
from trainer.ingest import Disposition, IngestOptions, UpdateIngestor
from trainer.ingest_metrics import IngestMetrics
from trainer.ledger import UpdateLedger
from trainer.rounds import RoundBook, RoundPolicy
from trainer.strategies import get_strategy

DIM = 1_000_000  # 4 MB; the publisher is told 1 MiB, so every update goes via the store
SIZES = (DIM // 2, DIM - DIM // 2)
MODEL_BYTES = 4 * DIM
EDGES = [f"edge-{i}" for i in range(1, 9)]


class Directory:
    def __init__(self, registry: EdgeRegistry) -> None:
        self.registry = registry

    def current(self) -> EdgeRegistry:
        return self.registry


async def ingest_round(
    ingestor: UpdateIngestor, publish: UpdatePublisher, book: RoundBook, n: int, keys: Any
) -> tuple[int, int]:
    """Publish ``n`` updates for ``book``'s open round, then ingest them and finalize while
    tracing; the traced peaks in bytes after ingesting and after finalizing."""
    a = book.current.announcement if book.current else None
    assert a is not None
    rng = np.random.default_rng(a.round)
    for edge in EDGES[:n]:
        delta = rng.normal(0, 1e-3, DIM).astype(np.float32)
        payload = encode_update(delta, SIZES, CompressionSettings(mode="none")).data
        _, envelope = seal_update(
            payload,
            recipient=keys["hpke"].public_key(),
            signer=keys[edge],
            model="wide",
            round=a.round,
            edge_id=edge,
            base_version=a.base_version,
            base_digest=a.base_digest,
            num_samples=10,
        )
        assert (await publish.publish(envelope)).via_object
        del envelope, payload, delta
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        for _ in range(n):
            (msg,) = await ingestor.fetch(1, 30.0)
            assert (await ingestor.handle(msg)).disposition is Disposition.ACCEPTED
        ingested = tracemalloc.get_traced_memory()[1]
        book.finalize()
        return ingested, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.timeout(240)
async def test_trainer_peak_memory_does_not_grow_with_the_number_of_updates(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys: dict[str, Any] = {e: ed25519.Ed25519PrivateKey.generate() for e in EDGES}
    keys["hpke"] = x25519.X25519PrivateKey.generate()
    registry = EdgeRegistry()
    for edge in EDGES:
        registry = registry.enroll(edge, keys[edge].public_key().public_bytes_raw().hex())
    nc = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    js = nc.jetstream()
    await ensure_transport(js, StreamSpec(max_msg_size=nc.max_payload))
    publish = UpdatePublisher(js, max_payload=1024 * 1024)  # every update via the store
    params = np.zeros(DIM, dtype=np.float32)
    driver = RoundDriver({}, tmp_path / "state", {"wide": SIZES})
    ingestor = UpdateIngestor(
        js,
        recipient=keys["hpke"],
        edges=Directory(registry),
        rounds=driver,
        aggregator=driver,
        ledger=await UpdateLedger.open(js),
        metrics=IngestMetrics(CollectorRegistry()),
        options=IngestOptions(fetch_timeout_s=5.0),
    )
    await ingestor.bind()
    peaks = []
    try:
        for round_no, n in ((1, 2), (2, 8)):
            book = RoundBook(
                "wide",
                RoundPolicy(min_updates=n),
                get_strategy("fedavg"),
                version=1,
                digest="0" * 64,
                params=params,
                next_round=round_no,
            )
            book.open(EDGES)
            driver.books["wide"] = book
            peaks.append(await ingest_round(ingestor, publish, book, n, keys))
    finally:
        await nc.close()
    (two_in, two), (eight_in, eight) = peaks
    detail = (
        f"peak {two / 1e6:.1f} MB for 2 updates, {eight / 1e6:.1f} MB for 8; while "
        f"ingesting {two_in / 1e6:.1f} MB and {eight_in / 1e6:.1f} MB"
    )
    assert eight < two + MODEL_BYTES, detail
    # ingesting holds the update in flight once: the buffer its object is read into and
    # opened in place (4.0 MB), and the chunks the object store client has queued but not
    # yet written there (up to the object's size when the client lags: at most 2.0x);
    # measured 6.7-7.3 MB (1.7-1.8x). Before: 9.0-9.1 MB (2.3x), the envelope, the
    # payload and a finiteness mask at once (and np.savez's copy at each checkpoint)
    assert eight_in < 2.15 * MODEL_BYTES, detail
    # finalizing adds the candidate (and a copy of an update clipped at settling)
    assert eight < 2.5 * MODEL_BYTES, detail
