"""Broker limits (#16 finding 6): one edge cannot fill JetStream for everyone.

Against the nats-server ``fedgate up`` starts (the deployment's per-role permissions), the
trainer creates the updates stream and object bucket from its settings
(:func:`trainer.service.updates_spec`) with small limits, then edges publish as themselves:

- one edge flooding its update subject is refused once it holds ``max_msgs_per_subject``
  messages, while another edge still publishes;
- when the stream is full, new updates are refused and no acknowledged one is dropped;
- an edge cannot spread a flood over made-up model subjects;
- the object bucket of large updates is bounded too, also when it existed before.

On the old code the stream and the bucket had no byte or per-subject limit (the flood was
stored in full) and an edge could publish on ``fedgate.updates.<any>.<itself>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, ObjectStoreConfig, StorageType

from edge_runtime.publisher import UpdatePublisher
from fedcore.subjects import inbox_prefix
from fedcore.transport import (
    INLINE_MAX_BYTES,
    UPDATES_OBJECT_BUCKET,
    UPDATES_STREAM,
    StreamSpec,
    update_subject,
)
from fedgate.launcher import Stack, StackConfig
from tests.conftest import processes_mentioning
from trainer.bus import ensure_object_bucket, ensure_transport
from trainer.service import updates_spec
from trainer.settings import TrainerSettings

EDGES = ["edge-1", "edge-2"]
KIB = 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("limits-nats")
    running = Stack(StackConfig(data_dir=data_dir, edges=len(EDGES)))
    try:
        running._start_nats()  # exactly as `fedgate up` starts it
        yield running
    finally:
        running.stop()
    assert processes_mentioning(str(data_dir)) == []


def _settings(tmp_path: Path, **limits: int) -> TrainerSettings:
    return TrainerSettings(
        nats_user="trainer",
        nats_password_file=tmp_path / "pass",
        data_dir=tmp_path,
        signing_key_file=tmp_path / "signing.key",
        hpke_private_key_file=tmp_path / "hpke.key",
        edge_registry_file=tmp_path / "edges.json",
        **limits,  # type: ignore[arg-type]
    )


ERRORS: dict[str, list[str]] = {}
"""Asynchronous errors (permission violations) the server sent each user."""


@pytest.fixture
async def conns(stack: Stack) -> AsyncIterator[dict[str, NATS]]:
    out = {}
    ERRORS.clear()
    for user in ["trainer", *EDGES]:
        password = (stack.config.data_dir / "secrets" / f"nats-{user}.pass").read_text().strip()
        errors = ERRORS.setdefault(user, [])

        async def on_error(exc: Exception, errors: list[str] = errors) -> None:
            errors.append(str(exc))

        out[user] = await nats.connect(
            stack.nats_url,
            user=user,
            password=password,
            inbox_prefix=inbox_prefix(user),
            connect_timeout=3,
            allow_reconnect=False,
            error_cb=on_error,
        )
    try:
        yield out
    finally:
        js = out["trainer"].jetstream()
        for name in (UPDATES_STREAM, f"OBJ_{UPDATES_OBJECT_BUCKET}"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        for nc in out.values():
            await nc.close()


def test_the_limits_are_settings_with_bounded_defaults(tmp_path: Path) -> None:
    spec = updates_spec(_settings(tmp_path), max_payload=8 * 1024 * KIB)
    assert spec.max_msg_size == INLINE_MAX_BYTES  # not the server's 8 MiB max_payload
    # one edge's subject holds at most a third of the stream
    assert spec.max_msgs_per_subject * spec.max_msg_size * 3 <= spec.max_bytes
    assert spec.object_max_bytes > 0
    small = updates_spec(
        _settings(
            tmp_path,
            updates_max_bytes=1000,
            updates_max_msgs_per_subject=3,
            updates_object_max_bytes=2000,
        ),
        max_payload=4096,
    )
    assert (small.max_bytes, small.max_msgs_per_subject, small.object_max_bytes) == (1000, 3, 2000)
    assert small.max_msg_size == 4096


async def test_one_edge_flooding_is_refused_while_another_still_publishes(
    tmp_path: Path, conns: dict[str, NATS]
) -> None:
    spec = updates_spec(
        _settings(
            tmp_path,
            updates_max_bytes=40 * KIB,
            updates_max_msgs_per_subject=4,
            updates_object_max_bytes=64 * KIB,
        ),
        max_payload=conns["trainer"].max_payload,
    )
    await ensure_transport(conns["trainer"].jetstream(), spec)
    info = await conns["trainer"].jetstream().stream_info(UPDATES_STREAM)
    assert info.config.discard == DiscardPolicy.NEW and info.config.discard_new_per_subject
    assert (info.config.max_bytes, info.config.max_msgs_per_subject) == (40 * KIB, 4)

    flood, other = conns["edge-1"].jetstream(timeout=2), conns["edge-2"].jetstream(timeout=2)
    body = b"u" * (4 * KIB)
    acked = [await flood.publish(update_subject("digits", "edge-1"), body) for _ in range(4)]
    assert [a.seq for a in acked] == [1, 2, 3, 4]
    for _ in range(3):  # the flood goes on: refused, and stays refused
        with pytest.raises(nats.js.errors.APIError, match="maximum messages per subject"):
            await flood.publish(update_subject("digits", "edge-1"), body)
    # another edge is not affected
    ack = await other.publish(update_subject("digits", "edge-2"), body)
    assert ack.stream == UPDATES_STREAM and ack.seq == 5

    # nor can the flood go to subjects of made-up models (each would get its own quota)
    with pytest.raises(nats.errors.Error):  # no permission: no ack ever comes
        await conns["edge-1"].jetstream(timeout=0.5).publish("fedgate.updates.model-x.edge-1", body)
    assert any("fedgate.updates.model-x.edge-1" in e for e in ERRORS["edge-1"]), ERRORS

    info = await conns["trainer"].jetstream().stream_info(UPDATES_STREAM)
    assert (info.state.first_seq, info.state.messages) == (1, 5)


async def test_a_full_stream_refuses_new_updates_and_keeps_the_acknowledged(
    tmp_path: Path, conns: dict[str, NATS]
) -> None:
    spec = updates_spec(
        _settings(
            tmp_path,
            updates_max_bytes=24 * KIB,
            updates_max_msgs_per_subject=100,
            updates_object_max_bytes=64 * KIB,
        ),
        max_payload=conns["trainer"].max_payload,
    )
    await ensure_transport(conns["trainer"].jetstream(), spec)
    body = b"u" * (4 * KIB)
    seqs = []
    refused = 0
    for i in range(8):
        edge = EDGES[i % 2]
        try:
            ack = (
                await conns[edge].jetstream(timeout=2).publish(update_subject("digits", edge), body)
            )
            seqs.append(ack.seq)
        except nats.js.errors.APIError as exc:
            assert "maximum bytes" in str(exc.description), exc
            refused += 1
    assert refused >= 2 and seqs == list(range(1, len(seqs) + 1))
    info = await conns["trainer"].jetstream().stream_info(UPDATES_STREAM)
    # nothing acknowledged was discarded to make room
    assert (info.state.first_seq, info.state.messages) == (1, len(seqs))


async def test_the_object_bucket_is_bounded_and_an_old_one_is_brought_to_the_limit(
    tmp_path: Path, conns: dict[str, NATS]
) -> None:
    trainer_js = conns["trainer"].jetstream()
    # a bucket from before the limits
    await trainer_js.create_object_store(
        UPDATES_OBJECT_BUCKET, ObjectStoreConfig(storage=StorageType.FILE)
    )
    spec = StreamSpec(object_max_bytes=96 * KIB)
    await ensure_object_bucket(trainer_js, spec)
    info = await trainer_js.stream_info(f"OBJ_{UPDATES_OBJECT_BUCKET}")
    assert info.config.max_bytes == 96 * KIB and info.config.discard == DiscardPolicy.NEW

    store = await conns["edge-1"].jetstream(timeout=2).object_store(UPDATES_OBJECT_BUCKET)
    await store.put("digits/edge-1/a", b"x" * (40 * KIB))
    # refused by the server; nats.py then tries to purge the partial object, which an
    # edge may not do, so what surfaces may be that purge's timeout
    with pytest.raises((nats.js.errors.APIError, nats.errors.TimeoutError)) as caught:
        await store.put("digits/edge-1/b", b"x" * (80 * KIB))
    chain: list[BaseException] = [caught.value]
    while chain[-1].__context__ is not None:
        chain.append(chain[-1].__context__)
    assert any("maximum bytes" in str(e) for e in chain), chain
    info = await trainer_js.stream_info(f"OBJ_{UPDATES_OBJECT_BUCKET}")
    assert info.state.bytes <= 96 * KIB
    got = await (await trainer_js.object_store(UPDATES_OBJECT_BUCKET)).get("digits/edge-1/a")
    assert got.data == b"x" * (40 * KIB)


async def test_edges_send_inline_only_what_the_stream_accepts(
    tmp_path: Path, conns: dict[str, NATS]
) -> None:
    """The stream's ``max_msg_size`` is the edges' inline limit (a larger envelope goes
    through the object store), not the server's 8 MiB ``max_payload``: one edge's subject
    holds at most ``max_msgs_per_subject`` such messages."""
    spec = updates_spec(_settings(tmp_path), max_payload=conns["trainer"].max_payload)
    await ensure_transport(conns["trainer"].jetstream(), spec)
    publisher = UpdatePublisher.for_connection(conns["edge-1"])
    assert publisher.max_payload == INLINE_MAX_BYTES < conns["edge-1"].max_payload
    with pytest.raises(nats.js.errors.APIError, match="message size"):
        await (
            conns["edge-1"]
            .jetstream(timeout=2)
            .publish(update_subject("digits", "edge-1"), b"x" * (INLINE_MAX_BYTES + 1))
        )
