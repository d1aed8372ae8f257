"""The update transport on a real nats-server: exactly once, large updates, the ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from nats.js.api import StorageType
from nats.js.errors import KeyNotFoundError

from fedcore.kv import kv_keys
from fedcore.transport import UPDATES_STREAM, StreamSpec
from tests.conftest import NatsServer
from tests.transport_harness import DIM, TARGET, SumAggregator, open_bus, seal
from trainer.bus import ensure_transport
from trainer.ingest import Disposition, IngestOptions
from trainer.ledger import LedgerRecord
from trainer.registry import edges_bucket, mirror_registry


def vector(seed: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


async def test_the_same_update_is_aggregated_once(nats_server: NatsServer, tmp_path: Path) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        delta = vector(1)
        update_id, envelope = seal(bus.keys, delta)

        # The same update three times: JetStream keeps one (Nats-Msg-Id = update id).
        first = await bus.publisher.publish(envelope)
        again = [await bus.publisher.publish(envelope) for _ in range(2)]
        assert not first.duplicate and not first.via_object
        assert all(p.duplicate and p.seq == first.seq for p in again)
        # A retry after the dedupe window: a new message id, a second copy in the stream.
        late = await bus.publisher.publish(envelope, msg_id="retry-after-the-window")
        assert not late.duplicate and late.seq == first.seq + 1

        msgs = await bus.ingestor.fetch(batch=10)
        assert [m.metadata.sequence.stream for m in msgs] == [first.seq, late.seq]
        # The first is folded and recorded, but the trainer "crashes" before its ack.
        assert (await bus.ingestor.process(msgs[0])).disposition is Disposition.ACCEPTED
        assert (await bus.ingestor.handle(msgs[1])).disposition is Disposition.DUPLICATE

        # After ack_wait the unacknowledged message comes back: a duplicate, acked now.
        await asyncio.sleep(1.2)
        redelivered = await bus.ingestor.fetch(batch=10, timeout_s=2.0)
        assert [m.metadata.num_delivered for m in redelivered] == [2]
        assert (await bus.ingestor.handle(redelivered[0])).disposition is Disposition.DUPLICATE
        assert await bus.ingestor.poll(timeout_s=1.5) == []  # nothing left to deliver

        np.testing.assert_array_equal(bus.aggregator.total, delta.astype(np.float64))
        assert bus.aggregator.folded == [update_id]
        assert bus.accepted() == 1 and bus.rejected("duplicate") == 2

        records = await bus.ledger.accepted("digits", TARGET.round)
        assert list(records) == ["edge-1"]
        assert records["edge-1"].update_id == update_id
        assert records["edge-1"].stream_seq == first.seq


async def test_a_restarted_trainer_refolds_only_what_its_checkpoint_lacks(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        deltas = {"edge-1": vector(2)}
        update_id, envelope = seal(bus.keys, deltas["edge-1"])
        await bus.publisher.publish(envelope)
        assert [o.disposition for o in await bus.ingestor.poll()] == [Disposition.ACCEPTED]

        # A new trainer process whose checkpoint predates the update: state is empty.
        fresh = SumAggregator()
        restarted = bus.new_ingestor(fresh, IngestOptions(ack_wait_s=1.0, fetch_timeout_s=0.5))
        await restarted.bind()
        await bus.publisher.publish(envelope, msg_id="replayed-later")
        assert [o.disposition for o in await restarted.poll()] == [Disposition.DUPLICATE]
        assert fresh.folded == []
        assert await restarted.refold(TARGET, folded=set()) == [update_id]
        np.testing.assert_array_equal(fresh.total, deltas["edge-1"].astype(np.float64))
        # A checkpoint that already holds it: nothing to refold.
        assert await restarted.refold(TARGET, folded={update_id}) == []


async def test_an_update_over_max_payload_goes_through_the_object_store(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        max_payload = bus.edge_nc.max_payload
        dim = max_payload // 4 + 1024  # just over the server's max_payload
        big = vector(3, dim)
        bus.rounds.current = TARGET.__class__(
            TARGET.model, TARGET.round, TARGET.base_version, TARGET.base_digest, (dim,)
        )
        bus.aggregator.total = np.zeros(dim)
        update_id, envelope = seal(bus.keys, big)
        assert len(envelope) > max_payload
        sent = await bus.publisher.publish(envelope)
        assert sent.via_object and sent.size == len(envelope)
        again = await bus.publisher.publish(envelope)  # retry: object kept, message deduped
        assert again.duplicate and again.seq == sent.seq

        raw = await bus.trainer_nc.jetstream().get_msg(UPDATES_STREAM, sent.seq)
        assert raw.data is not None and len(raw.data) < 1024 and raw.data.startswith(b"FGUP")
        outcomes = await bus.ingestor.poll()
        assert [o.disposition for o in outcomes] == [Disposition.ACCEPTED]
        np.testing.assert_array_equal(bus.aggregator.total, big.astype(np.float64))
        assert bus.aggregator.folded == [update_id]
        assert (
            bus.metrics.get_sample_value(
                "fedgate_trainer_update_wire_bytes_count", {"path": "object"}
            )
            == 1.0
        )


async def test_ledger_first_writer_wins_and_release(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        a = LedgerRecord.now("a" * 32, "0" * 64, 1, 10)
        b = LedgerRecord.now("b" * 32, "1" * 64, 2, 20)
        first = await bus.ledger.record("digits", 1, "edge-1", a)
        assert first.first and first.record == a
        second = await bus.ledger.record("digits", 1, "edge-1", b)
        assert not second.first and second.record == a
        assert (await bus.ledger.record("digits", 11, "edge-1", b)).first  # another round
        assert (await bus.ledger.record("digits", 1, "edge-2", b)).first
        assert set(await bus.ledger.accepted("digits", 1)) == {"edge-1", "edge-2"}
        assert set(await bus.ledger.accepted("digits", 11)) == {"edge-1"}
        assert await bus.ledger.accepted("digits", 2) == {}
        await bus.ledger.release("digits", 1, "edge-1", first.revision)
        assert set(await bus.ledger.accepted("digits", 1)) == {"edge-2"}
        assert (await bus.ledger.record("digits", 1, "edge-1", b)).first  # after a release


async def test_a_refused_fold_releases_the_claim(nats_server: NatsServer, tmp_path: Path) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        delta = vector(4)
        update_id, envelope = seal(bus.keys, delta)
        bus.aggregator.refuse = "buffer-full"
        await bus.publisher.publish(envelope)
        outcomes = await bus.ingestor.poll()
        assert [(o.disposition, o.reason) for o in outcomes] == [
            (Disposition.REJECTED, "buffer-full")
        ]
        assert await bus.ledger.accepted("digits", TARGET.round) == {}
        bus.aggregator.refuse = None
        await bus.publisher.publish(envelope, msg_id="sent-again")
        assert [o.disposition for o in await bus.ingestor.poll()] == [Disposition.ACCEPTED]
        assert bus.aggregator.folded == [update_id]


async def test_registry_mirror_in_kv(nats_server: NatsServer, tmp_path: Path) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        from fedcore.enrollment import load_registry

        js = bus.trainer_nc.jetstream()
        registry = load_registry(bus.keys.layout.registry)
        assert await mirror_registry(js, registry) == 2
        assert await mirror_registry(js, registry) == 0  # unchanged
        kv = await edges_bucket(js)
        assert (await kv.get("edge-3")).value == registry["edge-3"].encode()
        await kv.put("edge-9", b"{}")
        await kv.put("edge-1", b"{}")
        assert await mirror_registry(js, registry) == 1
        assert (await kv.get("edge-1")).value == registry["edge-1"].encode()
        assert await kv_keys(js, "fedgate_edges") == ["edge-1", "edge-3", "edge-9"]
        with pytest.raises(KeyNotFoundError):  # deleted
            await kv.get("edge-9")


async def test_transport_setup_is_idempotent_and_updates_the_stream(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with open_bus(nats_server, tmp_path) as bus:
        js = bus.trainer_nc.jetstream()
        spec = StreamSpec(duplicate_window_s=30.0, max_msg_size=bus.trainer_nc.max_payload)
        await ensure_transport(js, spec)
        await ensure_transport(js, spec)
        info = await js.stream_info(UPDATES_STREAM)
        assert info.config.duplicate_window == 30.0
        assert info.config.storage == StorageType.FILE
        assert info.config.subjects == ["fedgate.updates.>"]
        assert info.config.max_msg_size == bus.trainer_nc.max_payload
        await bus.ingestor.bind()  # a second bind reuses the durable consumer
        consumer = await js.consumer_info(UPDATES_STREAM, "trainer-updates")
        assert consumer.config.ack_wait == 1.0 and consumer.config.max_deliver == -1
