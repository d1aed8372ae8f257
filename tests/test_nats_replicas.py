"""Every stream, KV bucket and object store is created with the configured replicas, on a
real 3-node JetStream cluster, by the service that creates it (the trainer's and the
gateway's, with their NATS permissions); one found with fewer replicas is scaled up in
place with its data; one that cannot be had at the configured replicas is refused with a
message naming the stream, both counts and the server's reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from fedcore.artifact_store import MODELS_BUCKET
from fedcore.enrollment import EdgeRegistry, save_registry
from fedcore.kv import kv_bucket
from fedcore.replicas import ReplicasError
from fedcore.subjects import inbox_prefix
from fedcore.transport import EDGES_BUCKET, LEDGER_BUCKET, UPDATES_OBJECT_BUCKET, UPDATES_STREAM
from fedcore.wire import (
    DESIRED_BUCKET,
    LINEAGE_BUCKET,
    ROLLOUTS_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
)
from gateway.rollout_store import RolloutStore
from gateway.settings import GatewaySettings
from tests.nats_cluster import NatsCluster, start_nats_cluster
from trainer.registry import RegistryFile
from trainer.service import prepare_transport
from trainer.settings import TrainerSettings

TRAINER_ASSETS = {
    UPDATES_STREAM,
    f"OBJ_{UPDATES_OBJECT_BUCKET}",
    f"KV_{LEDGER_BUCKET}",
    f"KV_{EDGES_BUCKET}",
    f"KV_{ROUNDS_BUCKET}",
    f"KV_{ROUND_LOG_BUCKET}",
    f"KV_{LINEAGE_BUCKET}",
    f"OBJ_{MODELS_BUCKET}",
}
GATEWAY_ASSETS = {f"KV_{ROLLOUTS_BUCKET}", f"KV_{DESIRED_BUCKET}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    root = tmp_path_factory.mktemp("cluster")
    c = start_nats_cluster(root, ["admin", "trainer", "gateway"], limited=("trainer", "gateway"))
    yield c
    c.stop()


@pytest.fixture
async def conns(cluster: NatsCluster) -> AsyncIterator[dict[str, NATS]]:
    """One connection per user, each to a different server; every stream deleted after."""
    out = {}
    for i, user in enumerate(["admin", "trainer", "gateway"]):
        out[user] = await nats.connect(
            servers=[cluster.urls[i]],
            user=user,
            password=cluster.users[user],
            connect_timeout=5,
            inbox_prefix=inbox_prefix(user),
        )
    try:
        yield out
    finally:
        js = out["admin"].jetstream(timeout=10)
        for name in await js.streams_info():
            await js.delete_stream(name.config.name or "")
        for nc in out.values():
            await nc.close()


def trainer_settings(tmp_path: Path, replicas: int) -> TrainerSettings:
    return TrainerSettings(
        nats_user="trainer",
        nats_password_file=tmp_path / "pass",
        data_dir=tmp_path / "data",
        signing_key_file=tmp_path / "signing.key",
        hpke_private_key_file=tmp_path / "hpke.key",
        edge_registry_file=tmp_path / "registry.json",
        nats_replicas=replicas,
    )


def registry(tmp_path: Path) -> RegistryFile:
    save_registry(tmp_path / "registry.json", EdgeRegistry())
    return RegistryFile(tmp_path / "registry.json")


async def replicas_of(nc: NATS) -> dict[str, tuple[int, int]]:
    """Each stream: (configured replicas, servers holding a current copy)."""
    out = {}
    for info in await nc.jetstream(timeout=10).streams_info():
        current = [p for p in (info.cluster.replicas or []) if p.current] if info.cluster else []
        out[info.config.name or ""] = (info.config.num_replicas or 1, 1 + len(current))
    return out


async def settled_replicas(nc: NATS, want: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """:func:`replicas_of` once it equals ``want`` (new peers catch up in the background
    after a scale-up), or after 15 s."""
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        found = await replicas_of(nc)
        if found == want or asyncio.get_running_loop().time() > deadline:
            return dict(found)
        await asyncio.sleep(0.1)


async def test_every_asset_is_created_with_the_configured_replicas(
    conns: dict[str, NATS], tmp_path: Path
) -> None:
    await prepare_transport(conns["trainer"], trainer_settings(tmp_path, 3), registry(tmp_path))
    await RolloutStore.open(conns["gateway"].jetstream(timeout=10), 3)
    want = dict.fromkeys(TRAINER_ASSETS | GATEWAY_ASSETS, (3, 3))
    assert await settled_replicas(conns["admin"], want) == want


async def test_a_single_replica_bucket_is_scaled_up_in_place(
    conns: dict[str, NATS], tmp_path: Path
) -> None:
    admin = conns["admin"].jetstream(timeout=10)
    rounds = await admin.create_key_value(bucket=ROUNDS_BUCKET, replicas=1)
    await rounds.put("digits", b"round 7")
    models = await admin.create_object_store(MODELS_BUCKET)
    await models.put("digits/1/model.onnx", b"m" * 300_000)
    rollouts = await admin.create_key_value(bucket=ROLLOUTS_BUCKET, replicas=1)
    await rollouts.put("digits", b"canary")
    before = await replicas_of(conns["admin"])
    assert {before[f"KV_{ROUNDS_BUCKET}"], before[f"OBJ_{MODELS_BUCKET}"]} == {(1, 1)}

    await prepare_transport(conns["trainer"], trainer_settings(tmp_path, 3), registry(tmp_path))
    await RolloutStore.open(conns["gateway"].jetstream(timeout=10), 3)
    want = dict.fromkeys(TRAINER_ASSETS | GATEWAY_ASSETS, (3, 3))
    assert await settled_replicas(conns["admin"], want) == want
    # the data came along, read through the other servers' connections
    trainer = conns["trainer"].jetstream(timeout=10)
    assert (await (await trainer.key_value(ROUNDS_BUCKET)).get("digits")).value == b"round 7"
    store = await trainer.object_store(MODELS_BUCKET)
    assert (await store.get("digits/1/model.onnx")).data == b"m" * 300_000
    gateway = conns["gateway"].jetstream(timeout=10)
    assert (await (await gateway.key_value(ROLLOUTS_BUCKET)).get("digits")).value == b"canary"


async def test_a_bucket_that_cannot_have_the_replicas_is_refused_clearly(
    conns: dict[str, NATS],
) -> None:
    admin = conns["admin"].jetstream(timeout=10)
    await admin.create_key_value(bucket=ROUNDS_BUCKET, replicas=1)
    trainer = conns["trainer"].jetstream(timeout=10)
    with pytest.raises(ReplicasError) as scaled:  # 5 replicas on 3 servers
        await kv_bucket(trainer, ROUNDS_BUCKET, 5)
    assert (scaled.value.stream, scaled.value.have, scaled.value.want) == (
        f"KV_{ROUNDS_BUCKET}",
        1,
        5,
    )
    message = str(scaled.value)
    assert f"stream KV_{ROUNDS_BUCKET} has 1 replica(s), configured 5" in message
    assert "at least 5 servers" in message and scaled.value.detail
    with pytest.raises(ReplicasError, match=f"stream KV_{LINEAGE_BUCKET} configured 5"):
        await kv_bucket(trainer, LINEAGE_BUCKET, 5)
    assert (await replicas_of(conns["admin"]))[f"KV_{ROUNDS_BUCKET}"] == (1, 1)  # untouched


def test_the_replicas_settings_take_only_odd_raft_sizes(tmp_path: Path) -> None:
    for bad in (0, 2, 4):
        with pytest.raises(ValidationError, match="is not 1, 3 or 5"):
            trainer_settings(tmp_path, bad)
        with pytest.raises(ValidationError, match="is not 1, 3 or 5"):
            GatewaySettings(nats_user="g", nats_password_file=tmp_path / "p", nats_replicas=bad)
    assert GatewaySettings(nats_user="g", nats_password_file=tmp_path / "p").nats_replicas == 1
