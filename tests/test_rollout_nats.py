"""Rollout buckets under the deployment's NATS permissions (compose config, real
nats-server, mTLS): the gateway owns the rollout and desired-versions buckets and reads
the model store; edges read the desired versions and write none of them."""

from __future__ import annotations

import time

import nats
import pytest
from nats.aio.client import Client as NATS

from fedcore.artifact_store import MODELS_BUCKET, model_object_name
from fedcore.wire import DESIRED_BUCKET, ROLLOUTS_BUCKET, DesiredVersions
from gateway.rollout_machine import RolloutSpec, new_rollout
from gateway.rollout_store import RolloutStore
from tests.test_deploy_nats import ComposeNats, clients, compose_nats, tls_dir  # noqa: F401


async def test_gateway_owns_rollout_buckets_edges_read_desired(
    compose_nats: ComposeNats,  # noqa: F811
    clients: dict[str, NATS],  # noqa: F811
) -> None:
    trainer_js = clients["trainer"].jetstream()
    models = await trainer_js.create_object_store(MODELS_BUCKET)
    await models.put(model_object_name("digits", 2, "manifest.json"), b"{}")
    try:
        store = await RolloutStore.open(clients["gateway"].jetstream(timeout=2))
        r = new_rollout("digits", 1, RolloutSpec(version=2), "ops", time.time())
        revision = await store.replace(r, None)
        assert (await store.current("digits")) == (r, revision)
        assert [h.id for h in await store.history("digits")] == [r.id]
        assert await store.version_exists("digits", 2)
        assert not await store.version_exists("digits", 3)
        desired = DesiredVersions(model="digits", stable=1, candidate=2, rollout=r.id, ts=1.0)
        await store.put_desired(desired)
        assert await compose_nats.violations(clients["gateway"], "gateway", expect=False) == []

        edge_js = clients["edge-1"].jetstream(timeout=2)
        kv = await edge_js.key_value(DESIRED_BUCKET)
        watcher = await kv.watchall()
        entry = await watcher.updates(timeout=2)
        assert entry is not None and DesiredVersions.decode(entry.value) == desired
        await watcher.stop()
        assert await compose_nats.violations(clients["edge-1"], "edge-1", expect=False) == []

        weak = clients["edge-1"].jetstream(timeout=0.5)
        with pytest.raises(nats.errors.Error):
            await (await weak.key_value(DESIRED_BUCKET)).put("digits", b"forged")
        await compose_nats.violation(clients["edge-1"], "edge-1", "$kv.fedgate_desired")
        with pytest.raises(nats.errors.Error):
            await weak.key_value(ROLLOUTS_BUCKET)
        gateway_weak = clients["gateway"].jetstream(timeout=0.5)
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await (await gateway_weak.object_store(MODELS_BUCKET)).put("digits/3/x", b"x")
        await compose_nats.violation(clients["gateway"], "gateway", "$o.fedgate_models")
    finally:
        await trainer_js.delete_object_store(MODELS_BUCKET)
        await trainer_js.delete_key_value(ROLLOUTS_BUCKET)
        await trainer_js.delete_key_value(DESIRED_BUCKET)
