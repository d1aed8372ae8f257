"""One model's failure stays with that model: an edge serving digits and diabetes whose
diabetes version Triton cannot load (signed, but its ONNX file is garbage) still serves
digits, and its heartbeat says diabetes has no ready version, with Triton's reason; after
tritonserver is killed, the edge restarts it and digits serves again. Real nats-server,
edge runtime process and tritonserver."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import nats
import nats.errors
import numpy as np
import pytest

from fedcore.artifact import sign_version_dir
from fedcore.keys import load_ed25519
from fedcore.models import get_spec
from fedcore.process import ManagedProcess, free_port
from fedcore.subjects import inbox_prefix
from fedcore.wire import Heartbeat
from tests.conftest import SignedArtifacts, processes_mentioning, start_nats, unseal
from tests.rollout_harness import _edge_env
from trainer.bootstrap import train_seed_model, write_version

pytestmark = pytest.mark.slow


def seeds_with_a_broken_model(root: Path, signed: SignedArtifacts) -> Path:
    seed = root / "seed"
    shutil.copytree(signed.artifacts / "digits", seed / "digits")
    key = load_ed25519(signed.private_key)
    spec = get_spec("diabetes")
    broken = seed / "diabetes" / "1"
    write_version(spec, train_seed_model(spec, 0.1, 1, 0), broken, key, version=1)
    unseal(broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    (broken / "manifest.json").unlink()
    sign_version_dir(broken, key, model="diabetes", version=1)  # signed: it installs, fails to load
    return seed


async def heartbeat(url: str, password: str, after: float = 0.0) -> Heartbeat:
    """The first heartbeat (stamped after ``after``) with digits ready."""
    nc = await nats.connect(
        url, user="gateway", password=password, inbox_prefix=inbox_prefix("gateway")
    )
    try:
        sub = await nc.subscribe("fedgate.fleet.heartbeat.edge-1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 180  # the edge heartbeats once Triton is up and loaded
        while loop.time() < deadline:
            try:
                msg = await sub.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                continue
            beat = Heartbeat.decode(msg.data)
            if beat.ts > after and beat.models.get("digits") and beat.models["digits"].ready:
                return beat
        raise TimeoutError("no heartbeat with digits ready")
    finally:
        await nc.close()


def test_a_model_that_fails_to_load_leaves_the_other_serving(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    server = start_nats(tmp_path / "nats", ["gateway", "edge-1"])
    seed = seeds_with_a_broken_model(tmp_path, signed_v1)
    port = free_port()
    values = _edge_env(tmp_path, server, signed_v1, "edge-1") | {
        "TRITON_HTTP_PORT": str(port),
        "SEED_ARTIFACTS_DIR": str(seed),
        "MODELS": json.dumps(["digits", "diabetes"]),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    env.update({f"FEDGATE_EDGE_{k}": str(v) for k, v in values.items()})
    edge = ManagedProcess(
        "edge-1", [sys.executable, "-m", "edge_runtime"], log_path=tmp_path / "edge.log", env=env
    )
    edge.start()
    try:
        beat = asyncio.run(heartbeat(server.url, server.users["gateway"]))
        assert beat.models["digits"].ready == [1]
        assert beat.models["diabetes"].ready == []
        assert beat.models["diabetes"].failed, beat.models["diabetes"]
        _, _, x, _ = get_spec("digits").dataset()  # type: ignore[misc]
        body = {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "data": np.asarray(x[0]).tolist(),
                }
            ]
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/digits/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            assert len(json.loads(resp.read())["outputs"][0]["data"]) == 10
        assert edge.exited() is None  # still running

        # tritonserver dies: the edge restarts it; diabetes failing again must not stop it
        pid = int((tmp_path / "edge-1" / "triton" / "tritonserver.pid").read_text())
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        again = asyncio.run(heartbeat(server.url, server.users["gateway"], after=killed + 0.5))
        assert again.models["digits"].ready == [1] and again.models["diabetes"].ready == []
        assert int((tmp_path / "edge-1" / "triton" / "tritonserver.pid").read_text()) != pid
    finally:
        edge.stop(timeout=20)
        server.process.stop()
    assert processes_mentioning(str(tmp_path)) == []
