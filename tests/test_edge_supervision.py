"""The edge runtime supervises its tritonserver (real Triton, real NATS, real gateway).

1. The server alone is killed with SIGKILL (as a SIGSEGV would end it; its python-backend
   stub stays behind): the next heartbeat says no version is ready, the gateway stops
   routing to the edge, the stub does not linger (nor its shared memory), Triton starts
   again and loads the versions it served (1 and 2), the edge is routed to again, and
   the restart is counted in ``fedgate_edge_triton_restarts_total``.
2. The server is frozen with SIGSTOP (it accepts connections but answers nothing) after
   version 2's weights were altered on disk: the liveness probe times out, the edge
   says not-ready, Triton is killed and restarted, and only what still verifies against
   the trainer's key (version 1) is loaded again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from nats.aio.msg import Msg

from edge_runtime.triton import SHM_DIR, _shm_regions
from fedcore import subjects
from fedcore.artifact import install_version
from fedcore.keys import ed25519_public_from_hex, load_ed25519
from fedcore.models import get_spec
from fedcore.process import free_port
from fedcore.wire import Heartbeat, decode_heartbeat
from tests.conftest import NatsServer, SignedArtifacts, processes_mentioning
from tests.edge_harness import MODEL, Stack, running_stack

pytestmark = pytest.mark.slow

ROW = [0.5] * 64
SUPERVISION = {
    "learning_enabled": False,
    "triton_probe_interval_s": 0.5,
    "triton_probe_timeout_s": 1.0,
    "triton_probe_failures": 2,
    "triton_restart_base_s": 0.2,
}


class Beats:
    """Every heartbeat of edge-1, with the time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Heartbeat]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((time.monotonic(), decode_heartbeat(msg.data)))

    async def wait(self, what: Callable[[Heartbeat], bool], since: float, within: float) -> float:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for at, beat in list(self.seen):
                if at >= since and what(beat):
                    return at
            await asyncio.sleep(0.05)
        last = self.seen[-1][1].models if self.seen else None
        raise AssertionError(f"no such heartbeat within {within}s (last: {last})")


def ready(versions: list[int]) -> Callable[[Heartbeat], bool]:
    return lambda beat: sorted(beat.models[MODEL].ready) == versions


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def restarts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("fedgate_edge_triton_restarts_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def serve_version_2(stack: Stack, signed: SignedArtifacts, root: Path) -> None:
    """Install and load a signed version 2 next to 1, as a rollout would."""
    from trainer.bootstrap import write_version

    rng = np.random.default_rng(1)
    params = signed.params + rng.normal(0, 1e-3, signed.params.shape).astype("float32")
    directory = root / "v2" / MODEL / "2"
    key = load_ed25519(signed.private_key)
    write_version(get_spec(MODEL), params, directory, key, version=2, parent_version=1)
    trusted = ed25519_public_from_hex(signed.public_hex)
    install_version(directory, stack.runtime.repository / MODEL, trusted, version=2)
    stack.runtime.triton.load(MODEL)


async def served_by_gateway(stack: Stack, version: int) -> str:
    resp = await stack.http.post(
        f"{stack.gateway_url}/v2/models/{MODEL}/versions/{version}/infer",
        json={
            "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]
        },
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["x-fedgate-model-version"]


async def test_triton_killed_or_hung_is_restarted_with_its_verified_versions(
    tmp_path: Path, nats_server: NatsServer, signed_v1: SignedArtifacts
) -> None:
    metrics_port = free_port()
    async with running_stack(
        tmp_path, nats_server, signed_v1, metrics_port=metrics_port, **SUPERVISION
    ) as stack:
        runtime = stack.runtime
        beats = Beats()
        await stack.trainer_nc.subscribe(subjects.heartbeat("edge-1"), cb=beats.on_msg)
        serve_version_2(stack, signed_v1, tmp_path)
        await beats.wait(ready([1, 2]), 0, 10)
        assert restarts(metrics_port) == {"exited": 0, "hung": 0}

        # 1. SIGKILL of the server alone: its stub is left behind
        server = runtime.triton.process.pid
        assert server is not None
        stubs = [p for p in runtime.triton.process.members() if p != server]
        regions = _shm_regions(stubs)
        assert stubs and regions
        killed = time.monotonic()
        os.kill(server, signal.SIGKILL)
        down = await beats.wait(ready([]), killed, 3)
        assert down - killed < 2.0
        back = await beats.wait(ready([1, 2]), down, 90)
        assert runtime.triton.process.pid != server
        assert not any(alive(p) for p in stubs)
        assert not any((SHM_DIR / r).exists() for r in regions)
        assert await served_by_gateway(stack, 2) == "2"
        assert await served_by_gateway(stack, 1) == "1"
        assert restarts(metrics_port) == {"exited": 1, "hung": 0}

        # 2. a frozen server, and version 2 altered on disk in the meantime
        weights = runtime.repository / MODEL / "2" / "weights.npy"
        weights.write_bytes(weights.read_bytes() + b"\0")
        frozen = runtime.triton.process.pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        down = await beats.wait(ready([]), max(stopped, back), 10)
        await beats.wait(ready([1]), down, 90)
        assert not alive(frozen)
        assert not (runtime.repository / MODEL / "2").exists()  # unverified: not served
        assert await served_by_gateway(stack, 1) == "1"
        assert restarts(metrics_port) == {"exited": 1, "hung": 1}
    assert processes_mentioning(str(tmp_path / "edge")) == []  # no Triton, no stub
