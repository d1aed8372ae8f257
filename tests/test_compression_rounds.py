"""Every lossy compression mode from the edge's update path to the real trainer process
over a real nats-server: fp16, int8 with error feedback and top-k with error feedback,
two rounds with the edges restarted in between (their residuals read back from disk).
Each released version must equal the one before plus the sample-weighted mean of what
the edges' bytes decode to, recomputed here from the deltas and residuals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.publisher import UpdatePublisher, load_edge_keys
from edge_runtime.sealer import Keys, UpdateFor, UpdateSealer
from fedcore.compression import CompressionSettings
from fedgate.keys_cmd import KeyLayout, init_keys
from tests.conftest import NatsServer
from tests.trainer_process import (
    DIM,
    SIZES,
    released_weights,
    trainer_and_edge,
    wait_open,
    wait_record,
)

pytestmark = pytest.mark.slow

TOPK = 0.05
MODES = {
    "edge-1": CompressionSettings(mode="fp16"),
    "edge-2": CompressionSettings(mode="int8"),
    "edge-3": CompressionSettings(mode="topk", topk_fraction=TOPK),
}
SAMPLES = {"edge-1": 20, "edge-2": 50, "edge-3": 30}
Vector = Any


def fp16(x: Vector) -> Vector:
    return x.astype(np.float16).astype(np.float32)


def int8(x: Vector) -> Vector:
    """Per tensor: scale max|x| / 127, values rint(x / scale) * scale."""
    out, start = np.empty_like(x), 0
    for size in SIZES:
        part = x[start : start + size]
        scale = np.float32(np.abs(part).max() / 127)
        out[start : start + size] = np.rint(part / scale) * scale
        start += size
    return out


def topk(x: Vector) -> Vector:
    k = math.ceil(TOPK * x.size)
    out = np.zeros_like(x)
    keep = np.argsort(-np.abs(x), kind="stable")[:k]
    out[keep] = x[keep]
    return out


EXPECT = {"edge-1": fp16, "edge-2": int8, "edge-3": topk}


def sealers(keys: KeyLayout, root: Path) -> dict[str, UpdateSealer]:
    """Each edge's update path as the learner builds it (a restart builds it again)."""
    out = {}
    for edge, compression in MODES.items():
        signer, recipient = load_edge_keys(keys.edge_key(edge), keys.hpke_pub)
        out[edge] = UpdateSealer(
            edge_id=edge,
            sizes=SIZES,
            compression=compression,
            keys=Keys(signer, recipient),
            residual_file=root / edge / "error-feedback.npy",
        )
    return out


@pytest.mark.timeout(180)
async def test_each_compression_mode_folds_what_the_edge_sent(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", list(MODES))
    rng = np.random.default_rng(11)
    residuals = {e: np.zeros(DIM, np.float32) for e in MODES}  # the test's own bookkeeping
    wire: dict[str, list[int]] = {e: [] for e in MODES}
    total = sum(SAMPLES.values())
    async with trainer_and_edge(tmp_path, keys, nats_server, MIN_UPDATES="3") as (trainer, nc):
        js = nc.jetstream()
        publisher = UpdatePublisher.for_connection(nc)
        for rnd in (1, 2):
            edges = sealers(keys, tmp_path / "edges")  # round 2: restarted edges
            a = await wait_open(js, rnd, trainer)
            target = UpdateFor("digits", a.round, a.base_version, a.base_digest)
            mean = np.zeros(DIM, np.float64)
            for edge, sealer in edges.items():
                np.testing.assert_array_equal(sealer.feedback.residual, residuals[edge])
                delta = rng.normal(0.0, 1e-3, DIM).astype(np.float32)
                sealed = sealer.seal(delta, target, num_samples=SAMPLES[edge])
                assert sealed.header.compression == MODES[edge].mode
                await publisher.publish(sealed.envelope)
                sealer.commit(sealed)
                carried = delta + residuals[edge]
                sent = EXPECT[edge](carried)
                residuals[edge] = carried - sent
                np.testing.assert_allclose(sealer.feedback.residual, residuals[edge], atol=1e-9)
                mean += SAMPLES[edge] * sent.astype(np.float64) / total
                wire[edge].append(sealed.encoded.encoded_bytes)
            record = await wait_record(js, rnd, trainer)
            assert record.outcome == "released" and record.released_version == rnd + 1
            before = released_weights(tmp_path, rnd)
            np.testing.assert_allclose(
                released_weights(tmp_path, rnd + 1), before + mean, rtol=0, atol=2e-7
            )
    assert np.abs(residuals["edge-2"]).max() > 0 and np.abs(residuals["edge-3"]).max() > 0
    assert wire == {
        "edge-1": [2 * DIM] * 2,
        "edge-2": [DIM + 4 * len(SIZES)] * 2,
        "edge-3": [8 * math.ceil(TOPK * DIM)] * 2,
    }
