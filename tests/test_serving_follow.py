"""After a rolled-back rollout the trainer follows the version the fleet serves (real
trainer process, real nats-server; the gateway's part is played by its own store code).

Found by reading the code: the trainer based every round on its newest release. When the
canary of that release failed, the gateway rolled it back and the edges dropped it, so
every later round named a base no edge served; every edge refused it ('base-not-served')
and the fleet never learnt again."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client as NATS

from edge_runtime.rounds_watch import Plan, Refusal, ServedVersion, decide
from fedcore.artifact import sha256_file
from fedcore.triton_model import ONNX_FILE
from fedcore.wire import DesiredVersions, RoundAnnouncement
from fedgate.keys_cmd import KeyLayout, init_keys
from gateway.rollout_machine import (
    Rollout,
    RolloutSpec,
    desired_of,
    new_rollout,
    promoted,
    rolled_back,
)
from gateway.rollout_store import RolloutStore
from tests.conftest import NatsServer
from tests.trainer_process import (
    DIM,
    released_weights,
    send,
    start_trainer,
    stop_trainer,
    trainer_and_edge,
    wait_open,
    wait_record,
)

EDGES = ["edge-1", "edge-2", "edge-3"]
MODEL = "digits"


async def rollout(nc: NATS, version: int, stable: int, *, passes: bool) -> Rollout:
    """What the gateway writes for a rollout of ``version`` over ``stable``: the record
    and the desired versions while staging, then the decision and the settled desired
    versions (the candidate dropped on a rollback, the stable one on a promotion)."""
    store = await RolloutStore.open(nc.jetstream())
    now = time.time()
    r = new_rollout(MODEL, stable, RolloutSpec(version=version), "trainer", now)
    found = await store.current(MODEL)
    revision = await store.replace(r, found[1] if found else None)
    staging = r.moved(now, "staging", "staging", state="staging")
    revision = await store.replace(staging, revision)
    await store.put_desired(
        DesiredVersions(model=MODEL, stable=stable, candidate=version, rollout=r.id, ts=now)
    )
    await asyncio.sleep(0.5)
    decide = promoted if passes else rolled_back
    decided = decide(staging, time.time(), "gate failed at 10% of traffic: error rate")
    await store.replace(decided, revision)
    settled = desired_of(decided, time.time(), 0.0)
    assert settled is not None and settled.candidate is None
    await store.put_desired(settled)
    return decided


async def release_round(
    nc: NATS, keys: KeyLayout, a: RoundAnnouncement, rng: np.random.Generator
) -> list[np.ndarray]:
    deltas = [rng.normal(0, 1e-3, DIM).astype(np.float32) for _ in EDGES]
    for edge, delta in zip(EDGES, deltas, strict=True):
        await send(nc, keys, edge, a, delta, 10)
    return deltas


def artifacts(root: Path, version: int) -> Path:
    return root / "trainer" / "artifacts" / MODEL / str(version)


@pytest.mark.timeout(300)
async def test_a_rolled_back_version_is_not_the_base_of_later_rounds(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    rng = np.random.default_rng(3)
    async with trainer_and_edge(tmp_path, keys, nats_server) as (trainer, nc):
        js = nc.jetstream()
        a1 = await wait_open(js, 1, trainer)
        await release_round(nc, keys, a1, rng)
        assert (await wait_record(js, 1, trainer)).released_version == 2
        await rollout(nc, 2, 1, passes=True)  # version 2 serves everywhere
        a2 = await wait_open(js, 2, trainer)
        await release_round(nc, keys, a2, rng)
        assert (await wait_record(js, 2, trainer)).released_version == 3
        a3 = await wait_open(js, 3, trainer)
        assert a3.base_version == 3
        await send(nc, keys, "edge-1", a3, rng.normal(0, 1e-3, DIM).astype(np.float32), 10)

        r3 = await rollout(nc, 3, 2, passes=False)  # the canary of version 3 fails

        a4 = await wait_open(js, 4, trainer)
        assert (a4.base_version, a4.base_digest) == (
            2,
            sha256_file(artifacts(tmp_path, 2) / ONNX_FILE),
        )
        # what an edge that serves version 2 alone (after the rollback) makes of the rounds
        v2 = ServedVersion(2, a4.base_digest, artifacts(tmp_path, 2) / "weights.npy")
        refused = decide(a3, "edge-1", {2: v2}, [], time.time())
        assert isinstance(refused, Refusal) and refused.reason == "base-not-served"
        plan = decide(a4, "edge-1", {2: v2}, [], time.time())
        assert isinstance(plan, Plan) and plan.base == v2
        abandoned = await wait_record(js, 3, trainer)
        assert abandoned.outcome == "failed" and r3.id in abandoned.reason
        # an update trained on the dropped version is refused, one from version 2 counts
        stale = a4.model_copy(
            update={
                "base_version": 3,
                "base_digest": sha256_file(artifacts(tmp_path, 3) / ONNX_FILE),
            }
        )
        await send(nc, keys, "edge-1", stale, np.ones(DIM, np.float32), 10)
        deltas = await release_round(nc, keys, a4, rng)
        r4 = await wait_record(js, 4, trainer)
        assert r4.outcome == "released" and r4.released_version == 4  # never 3 again
        assert sorted((c.edge_id, c.base_version) for c in r4.contributors) == [
            (e, 2) for e in EDGES
        ]
        # the momentum of the dropped steps is gone and the step shrinks as after a hold
        assert r4.step_scale == 0.5
        expected = released_weights(tmp_path, 2) + 0.5 * sum(deltas) / len(deltas)
        np.testing.assert_allclose(released_weights(tmp_path, 4), expected, atol=1e-6)
        manifest = json.loads((artifacts(tmp_path, 4) / "manifest.json").read_text())
        assert manifest["manifest"]["parent_version"] == 2
        a5 = await wait_open(js, 5, trainer)
        assert a5.base_version == 4
    log = (tmp_path / "trainer.log").read_text()
    warned = [json.loads(line) for line in log.splitlines() if "rebased" in line]
    assert any(w["level"] == "WARNING" and w.get("rollout") == r3.id for w in warned), warned


@pytest.mark.timeout(300)
async def test_a_trainer_started_after_a_rollback_bases_its_rounds_on_the_stable_version(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    rng = np.random.default_rng(4)
    async with trainer_and_edge(tmp_path, keys, nats_server) as (trainer, nc):
        js = nc.jetstream()
        await release_round(nc, keys, await wait_open(js, 1, trainer), rng)
        assert (await wait_record(js, 1, trainer)).released_version == 2
        assert (await wait_open(js, 2, trainer)).base_version == 2
        assert stop_trainer(trainer) == 0
        r2 = await rollout(nc, 2, 1, passes=False)  # rolled back while the trainer was down
        restarted = start_trainer(tmp_path, keys, nats_server)
        try:
            a3 = await wait_open(js, 3, restarted)
            assert (a3.base_version, a3.base_digest) == (
                1,
                sha256_file(artifacts(tmp_path, 1) / ONNX_FILE),
            )
            abandoned = await wait_record(js, 2, restarted)
            assert abandoned.outcome == "failed" and r2.id in abandoned.reason
            await release_round(nc, keys, a3, rng)
            assert (await wait_record(js, 3, restarted)).released_version == 3
            manifest = json.loads((artifacts(tmp_path, 3) / "manifest.json").read_text())
            assert manifest["manifest"]["parent_version"] == 1
        finally:
            assert stop_trainer(restarted) == 0
