"""The trainer service over a real nats-server: three rounds from three edges, with a
``kill -9`` of the trainer in the middle of round 2. Nothing accepted is lost or counted
twice: version 3 equals version 2 plus the sample-weighted mean of round 2's updates."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import nats
import numpy as np
import pytest

from edge_runtime.publisher import UpdatePublisher
from fedcore.params import load_weights_file
from fedcore.wire import ROUND_LOG_BUCKET, ROUNDS_BUCKET, round_key
from fedgate.keys_cmd import init_keys
from tests.conftest import NatsServer
from tests.trainer_process import DIM, open_round, record_of, send, start_trainer, wait_kv

EDGES = ["edge-1", "edge-2", "edge-3"]


@pytest.mark.timeout(240)
async def test_three_rounds_with_a_trainer_kill(tmp_path: Path, nats_server: NatsServer) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    trainer = start_trainer(tmp_path, keys, nats_server)
    nc = await nats.connect(nats_server.url, user="edge-1", password=nats_server.users["edge-1"])
    js = nc.jetstream()
    rng = np.random.default_rng(0)
    artifacts = tmp_path / "trainer" / "artifacts" / "digits"
    try:
        a1 = await wait_kv(js, ROUNDS_BUCKET, "digits", open_round(1), within_s=120)
        assert a1.base_version == 1
        for i, edge in enumerate(EDGES):
            await send(
                nc, keys, edge, a1, rng.normal(0, 1e-3, DIM).astype(np.float32), 10 * (i + 1)
            )
        r1 = await wait_kv(js, ROUND_LOG_BUCKET, round_key("digits", 1), record_of)
        assert r1.outcome == "released" and r1.released_version == 2
        assert [c.edge_id for c in r1.contributors] == EDGES

        a2 = await wait_kv(js, ROUNDS_BUCKET, "digits", open_round(2))
        assert a2.base_version == 2
        deltas = [rng.normal(0, 1e-3, DIM).astype(np.float32) for _ in EDGES]
        samples = [20, 30, 35]  # within twice the median: not capped (trainer.bounds)
        first = await send(nc, keys, "edge-1", a2, deltas[0], samples[0])
        await send(nc, keys, "edge-2", a2, deltas[1], samples[1])
        await asyncio.sleep(1.0)  # let the trainer fold (and checkpoint) them
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        trainer = start_trainer(tmp_path, keys, nats_server)
        # a retry after the dedupe window: same envelope, new message id; and a redelivery
        published = await UpdatePublisher.for_connection(nc).publish(
            first, msg_id="retry-after-window"
        )
        assert not published.duplicate  # the stream took it: only the ledger stops it
        await send(nc, keys, "edge-3", a2, deltas[2], samples[2])
        r2 = await wait_kv(js, ROUND_LOG_BUCKET, round_key("digits", 2), record_of)
        assert r2.outcome == "released" and r2.released_version == 3
        assert sorted(c.edge_id for c in r2.contributors) == EDGES
        v2 = load_weights_file(artifacts / "2" / "weights.npy")
        v3 = load_weights_file(artifacts / "3" / "weights.npy")
        expected = v2 + sum(n * d for n, d in zip(samples, deltas, strict=True)) / sum(samples)
        np.testing.assert_allclose(v3, expected, atol=1e-6)

        a3 = await wait_kv(js, ROUNDS_BUCKET, "digits", open_round(3))
        for edge in EDGES:
            await send(nc, keys, edge, a3, rng.normal(0, 1e-3, DIM).astype(np.float32), 10)
        r3 = await wait_kv(js, ROUND_LOG_BUCKET, round_key("digits", 3), record_of)
        assert r3.released_version == 4
        manifest = json.loads((artifacts / "4" / "manifest.json").read_text())["manifest"]
        assert manifest["parent_version"] == 3 and manifest["round"] == 3
    finally:
        await nc.close()
        trainer.send_signal(signal.SIGTERM)
        try:
            assert trainer.wait(timeout=30) == 0
        finally:
            if trainer.poll() is None:
                trainer.kill()
