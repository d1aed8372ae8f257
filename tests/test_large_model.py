"""A model well above the NATS max payload, through a real trainer over a real nats-server.

The server runs with ``max_payload`` 256 KiB and the model is ``wide`` at width 800
(700,810 parameters, 2.8 MB in FP32, eleven times the largest message). Sealed updates go
through the object store behind pointer messages, the released version's artifacts go to
and come back from the object store in chunks (the edge's download is verified against
the trainer's signature), and a secure round's masked inputs travel in parts
(:mod:`fedcore.secagg.parts`): before parts, the trainer refused to start such a model.
The full-size model (25 million parameters) is measured in ``benchmarks/large_model.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from edge_runtime.publisher import UpdatePublisher
from fedcore.artifact import verify_version_dir
from fedcore.artifact_store import download_version
from fedcore.compression import CompressionSettings, encode_update
from fedcore.envelope import seal_update
from fedcore.keys import load_ed25519, read_hpke_public
from fedcore.models.wide import parameter_count, wide_spec
from fedcore.params import layout, load_weights_file
from fedcore.secagg import SecAggConfig, round_params
from fedcore.secagg.quantize import dequantize_sum, quantize
from fedcore.subjects import inbox_prefix
from fedcore.wire import ROUND_LOG_BUCKET, ROUNDS_BUCKET, RoundAnnouncement, RoundRecord, round_key
from fedgate.keys_cmd import KeyLayout, init_keys
from tests.conftest import NatsServer, processes_mentioning, start_nats
from tests.secagg_edge import harness_delta
from tests.test_secagg_service import heartbeats_from, stop_all
from tests.trainer_process import open_round, record_of, wait_kv
from tests.transport_harness import trainer_env

EDGES = ["edge-1", "edge-2", "edge-3"]
HIDDEN = 800
DIM = parameter_count(HIDDEN)
SIZES = [int(np.prod(shape)) for _, shape in layout(wide_spec(HIDDEN).build_module())]
MAX_PAYLOAD = 256 * 1024
OPTIONS: dict[str, Any] = {"clip_norm": 1.0, "stochastic_rounding": False}


async def connect(server: NatsServer, user: str) -> NATS:
    """A connection as ``user`` with its own inbox prefix (the only one it may read)."""
    return await nats.connect(
        server.url, user=user, password=server.users[user], inbox_prefix=inbox_prefix(user)
    )


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_nats(
        tmp_path / "nats", ["trainer", "gateway", *EDGES], roles=True, max_payload=MAX_PAYLOAD
    )
    yield server
    server.process.stop()


def start_trainer(
    root: Path, keys: KeyLayout, server: NatsServer, **settings: str
) -> subprocess.Popen[bytes]:
    env = trainer_env(
        root, keys, server.url, server.password_files["trainer"], MODELS='["wide"]', **settings
    )
    env["FEDGATE_WIDE_HIDDEN"] = str(HIDDEN)
    log = (root / "trainer.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve"], env=env, stdout=log, stderr=log
    )


def start_edge(
    root: Path, keys: KeyLayout, server: NatsServer, edge: str
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    env.update(
        {
            "SECAGG_EDGE_ID": edge,
            "SECAGG_EDGE_MODEL": "wide",
            "SECAGG_EDGE_DIM": str(DIM),
            "SECAGG_EDGE_NATS_URL": server.url,
            "SECAGG_EDGE_PASSWORD_FILE": str(server.password_files[edge]),
            "SECAGG_EDGE_KEY": str(keys.edge_key(edge)),
            "SECAGG_EDGE_REGISTRY": str(keys.registry),
            "SECAGG_EDGE_OPTIONS": json.dumps(OPTIONS),
            "SECAGG_EDGE_LOG": str(root / f"{edge}.steps"),
        }
    )
    log = (root / f"{edge}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.secagg_edge"], env=env, stdout=log, stderr=log
    )


async def released_and_downloaded(
    root: Path, keys: KeyLayout, server: NatsServer
) -> tuple[np.ndarray, np.ndarray]:
    """Versions 1 and 2 as the trainer wrote them, after checking that an edge downloads
    version 2 from the object store intact and signed."""
    nc = await connect(server, "edge-1")
    try:
        dest = await download_version(nc.jetstream(), "wide", 2, root / "download")
    finally:
        await nc.close()
    trusted = load_ed25519(keys.signing_key).public_key()
    verify_version_dir(dest, trusted, model="wide", version=2)
    artifacts = root / "trainer" / "artifacts" / "wide"
    v2 = load_weights_file(artifacts / "2" / "weights.npy", DIM)
    np.testing.assert_array_equal(load_weights_file(dest / "weights.npy", DIM), v2)
    return load_weights_file(artifacts / "1" / "weights.npy", DIM), v2


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_round_of_a_model_over_max_payload_goes_through_the_object_store(
    tmp_path: Path, small_nats: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    trainer = start_trainer(tmp_path, keys, small_nats)
    nc = await connect(small_nats, "trainer")
    js = nc.jetstream()
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 1e-3, DIM).astype(np.float32) for _ in EDGES]
    try:
        a1 = await wait_kv(js, ROUNDS_BUCKET, "wide", open_round(1), 180, trainer)
        for edge, delta in zip(EDGES, deltas, strict=True):
            edge_nc = await connect(small_nats, edge)
            payload = encode_update(delta, SIZES, CompressionSettings(mode="none")).data
            _, envelope = seal_update(
                payload,
                recipient=read_hpke_public(keys.hpke_pub),
                signer=load_ed25519(keys.edge_key(edge)),
                model="wide",
                round=1,
                edge_id=edge,
                base_version=a1.base_version,
                base_digest=a1.base_digest,
                num_samples=10,
            )
            published = await UpdatePublisher.for_connection(edge_nc).publish(envelope)
            await edge_nc.close()
            assert published.via_object and published.size > 4 * DIM > 10 * MAX_PAYLOAD
        record = await wait_kv(js, ROUND_LOG_BUCKET, round_key("wide", 1), record_of, 120)
        assert record.outcome == "released", record
        v1, v2 = await released_and_downloaded(tmp_path, keys, small_nats)
        np.testing.assert_allclose(v2, v1 + np.mean(deltas, axis=0), rtol=0, atol=1e-6)
    finally:
        await nc.close()
        stop_all([trainer])
    assert trainer.returncode == 0


def expected_secure_v2(v1: np.ndarray) -> np.ndarray:
    params = round_params(SecAggConfig(**OPTIONS), len(EDGES))
    total = np.zeros(DIM, dtype=np.uint64)
    for edge in EDGES:
        total += quantize(harness_delta(edge, 1, DIM), params).astype(np.uint64)
    mean = dequantize_sum(total.astype(np.uint32), len(EDGES), params) / len(EDGES)
    return (v1.astype(np.float64) + mean).astype(np.float32)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_secure_round_of_a_model_over_max_payload_sends_masked_inputs_in_parts(
    tmp_path: Path, small_nats: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    edges = [start_edge(tmp_path, keys, small_nats, e) for e in EDGES]
    nc = await connect(small_nats, "trainer")
    js = nc.jetstream()
    await heartbeats_from(nc, EDGES)
    trainer = start_trainer(
        tmp_path,
        keys,
        small_nats,
        SECAGG=json.dumps({"wide": OPTIONS}),
        SECAGG_PHASE_TIMEOUT_S="20",
        ROUND_DEADLINE_S="60",
    )
    try:

        def secure_round(raw: bytes) -> RoundAnnouncement | None:
            a = RoundAnnouncement.decode(raw)
            return a if a.round == 1 and a.secure else None

        a1 = await wait_kv(js, ROUNDS_BUCKET, "wide", secure_round, 180, trainer)
        assert a1.sampled == EDGES
        record: RoundRecord = await wait_kv(
            js, ROUND_LOG_BUCKET, round_key("wide", 1), RoundRecord.decode, 120
        )
        assert record.outcome == "released", record
        assert record.secure and (record.survivors, record.dropped) == (3, 0)
        v1, v2 = await released_and_downloaded(tmp_path, keys, small_nats)
        np.testing.assert_allclose(v2, expected_secure_v2(v1), rtol=0, atol=1e-6)
    finally:
        await nc.close()
        stop_all([trainer, *edges])
    assert trainer.returncode == 0
    assert processes_mentioning(f"{sys.executable} -m tests.secagg_edge") == []
