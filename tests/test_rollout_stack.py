"""Rollouts end to end: real nats-server, two edge runtimes with real tritonservers, the
gateway; continuous concurrent load with feedback labels throughout.

1. A good version rolls out to every edge and is promoted with zero failed requests; the
   old version is unloaded everywhere afterwards.
2. A worse version (random weights, correctly signed) is rolled back by the accuracy gate
   fed by the clients' feedback labels.
3. A tampered artifact (and one signed by another key) is refused by every edge, which
   keeps serving; the reasons are in the heartbeats and the rollout.
4. The gateway restarts in the middle of a canary and resumes the rollout from KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.artifact import sign_version_dir
from fedcore.keys import generate_ed25519
from tests.conftest import SignedArtifacts, processes_mentioning
from tests.rollout_harness import MODEL, Load, RolloutStack, start_stack, write_signed

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

EDGES = ["edge-1", "edge-2"]
GOOD_GATES = {"max_error_rate": 0.0, "max_p99_ratio": 3.0, "p99_floor_ms": 50.0}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> Iterator[RolloutStack]:
    root = tmp_path_factory.mktemp("rollout")
    running = start_stack(root, signed_v1, EDGES)
    yield running
    running.stop()
    assert processes_mentioning(str(root)) == []


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> dict[int, Path]:
    """2 and 6: good; 3: random weights; 4: tampered after signing; 5: signed by a stranger."""
    root = tmp_path_factory.mktemp("versions")
    rng = np.random.default_rng(7)
    near = signed_v1.params + rng.normal(0, 1e-3, signed_v1.params.shape)
    out = {
        2: write_signed(root, signed_v1, 2, near),
        3: write_signed(root, signed_v1, 3, rng.normal(0, 0.1, signed_v1.params.shape)),
        4: write_signed(root, signed_v1, 4, near),
        5: write_signed(root, signed_v1, 5, near),
        6: write_signed(root, signed_v1, 6, near),
    }
    onnx = out[4] / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    stranger = generate_ed25519(root / "stranger.key")
    sign_version_dir(out[5], stranger, model=MODEL, version=5)
    return out


def start(stack: RolloutStack, version: int, **spec: Any) -> dict[str, Any]:
    status, body = stack.call("POST", f"/v1/models/{MODEL}/rollouts", {"version": version, **spec})
    assert status == 201, body
    return dict(body)


def kinds(rollout: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in rollout["events"]]


async def test_rollouts_end_to_end(stack: RolloutStack, versions: dict[int, Path]) -> None:
    for v, directory in versions.items():
        await stack.upload(directory, v)
    async with Load(stack.url, stack.keys["infer"], clients=4, label_share=0.5) as load:
        await asyncio.sleep(1.0)
        timings = await asyncio.to_thread(_good_rollout, stack, load)
        log.info("good rollout: %s", timings)  # the closing note's numbers (pytest -o log_cli=true)
        (stack.root / "timings.json").write_text(json.dumps(timings))
        await asyncio.to_thread(_worse_version_rolled_back, stack, load)
        await asyncio.to_thread(_bad_artifacts_refused, stack, load)
        await asyncio.to_thread(_restart_mid_rollout, stack, load)
    assert load.failed("good") == []
    assert load.failed("bad") == []
    assert load.failed("tampered") == []


def _good_rollout(stack: RolloutStack, load: Load) -> dict[str, float]:
    load.phase = "good"
    spec = {"canary": 30, "window_s": 3, "min_requests": 30, "gates": GOOD_GATES}
    t0 = time.time()
    r = start(stack, 2, **spec)
    assert r["state"] == "pending" and r["stable"] == 1 and r["version"] == 2
    # the same command again is a no-op; another rollout of the model meanwhile is a 409
    again = stack.call("POST", f"/v1/models/{MODEL}/rollouts", {"version": 2, **spec})
    assert again[0] == 200 and again[1]["id"] == r["id"]
    other = stack.call("POST", f"/v1/models/{MODEL}/rollouts", {"version": 6})
    assert other[0] == 409 and r["id"] in other[1]["error"]
    canary = stack.wait_rollout(r["id"], {"canary", "promoted"}, timeout=60)
    t_ready = time.time()
    done = stack.wait_rollout(r["id"], {"promoted"}, timeout=60, settled=True)
    t_settled = time.time()
    assert kinds(done)[:3] == ["created", "staging", "canary"]
    assert kinds(done)[-2:] == ["promoted", "settled"]
    stack.wait_edges(lambda s: s["ready"] == [2] and s["rollout"] == r["id"], timeout=10)
    served = load.versions("good")
    assert served.get("2", 0) > 0 and served.get("1", 0) > 0, served
    routing = stack.call("GET", f"/v1/models/{MODEL}/routing", key="infer")[1]
    assert routing["split"] == {"stable": 2, "candidate": None, "candidate_weight": 0.0}
    return {
        "requests_during_rollout": sum(served.values()),
        "request_to_all_edges_ready_s": round(canary["ready_ts"] - canary["created_ts"], 2),
        "request_to_canary_seen_by_client_s": round(t_ready - t0, 2),
        "request_to_promoted_s": round(done["decided_ts"] - done["created_ts"], 2),
        "request_to_old_version_unloaded_s": round(t_settled - t0, 2),
    }


def _worse_version_rolled_back(stack: RolloutStack, load: Load) -> None:
    load.phase = "bad"
    gates = {"min_accuracy": 0.6, "min_labels": 15, **GOOD_GATES}
    r = start(stack, 3, canary=50, window_s=60, min_requests=10, gates=gates)
    assert r["stable"] == 2
    done = stack.wait_rollout(r["id"], {"rolled_back"}, timeout=60, settled=True)
    assert "label accuracy" in done["reason"] and "< 0.6" in done["reason"], done["reason"]
    assert kinds(done)[-2:] == ["rolled_back", "settled"]
    stack.wait_edges(lambda s: s["ready"] == [2], timeout=10)
    assert load.versions("bad").get("3", 0) > 0
    assert load.feedback[200] > 0, load.feedback
    status, history = stack.call("GET", f"/v1/models/{MODEL}/rollouts")
    assert status == 200 and [h["state"] for h in history["rollouts"][:2]] == [
        "rolled_back",
        "promoted",
    ]


def _bad_artifacts_refused(stack: RolloutStack, load: Load) -> None:
    load.phase = "tampered"
    for version, reason in ((4, "digest-mismatch"), (5, "bad-signature")):
        r = start(stack, version, canary=10)
        done = stack.wait_rollout(r["id"], {"failed"}, timeout=60)
        for edge_id in EDGES:
            assert f"{edge_id}: refused: {reason}" in done["reason"], done["reason"]
        view = stack.wait_edges(lambda s, v=version: v in s["failed"] or str(v) in s["failed"])
        for state in view.values():
            assert state["ready"] == [2]
            assert f"refused: {reason}" in state["failed"][str(version)]
        for edge in stack.edges.values():
            assert not (edge.data_dir / "model_repository" / MODEL / str(version)).exists()
    assert load.versions("tampered").keys() == {"2"}


def _restart_mid_rollout(stack: RolloutStack, load: Load) -> None:
    load.phase = "restart"
    r = start(stack, 6, canary=30, window_s=8, min_requests=20, gates=GOOD_GATES)
    stack.wait_rollout(r["id"], {"canary"}, timeout=60)
    stack.stop_gateway()
    stack.start_gateway()
    resumed = stack.rollout(r["id"])
    assert resumed["state"] == "canary", resumed
    assert resumed["split"] == {"stable": 2, "candidate": 6, "candidate_weight": 0.3}
    done = stack.wait_rollout(r["id"], {"promoted"}, timeout=60, settled=True)
    assert kinds(done)[-2:] == ["promoted", "settled"]
    stack.wait_edges(lambda s: s["ready"] == [6], timeout=10)
    assert load.versions("restart").get("6", 0) > 0
