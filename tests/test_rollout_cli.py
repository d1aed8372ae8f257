"""``fedgate rollout start|status|promote|rollback`` against a gateway served by uvicorn
(real HTTP, real nats-server; the fleet is injected as heartbeats)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import uvicorn

from fedcore.artifact_store import MODELS_BUCKET, model_object_name
from fedcore.keys import write_secret
from fedcore.process import free_port
from fedcore.wire import Heartbeat, ModelState
from fedgate.cli import build_parser
from gateway.app import create_app
from gateway.auth import generate_key, key_line
from gateway.fleet import Fleet
from gateway.settings import GatewaySettings
from tests.conftest import NatsServer

MODEL = "digits"


class Served:
    def __init__(self, url: str, fleet: Fleet, key_file: Path) -> None:
        self.url, self.fleet, self.key_file = url, fleet, key_file

    def beat(self, ready: list[int], rollout: str | None = None) -> None:
        for edge in ("edge-1", "edge-2"):
            state = ModelState(ready=ready, rollout=rollout)
            self.fleet.observe(
                Heartbeat(
                    edge_id=edge, url="http://127.0.0.1:9", seq=1, ts=0, models={MODEL: state}
                )
            )

    def run(self, *argv: str) -> int:
        args = build_parser().parse_args(
            ["rollout", *argv, "--url", self.url, "--key-file", str(self.key_file)]
        )
        code: int = args.func(args)
        return code


async def _seed_store(server: NatsServer) -> None:
    nc = await nats.connect(server.url, user="trainer", password=server.users["trainer"])
    store = await nc.jetstream().create_object_store(MODELS_BUCKET)
    await store.put(model_object_name(MODEL, 2, "manifest.json"), b"{}")
    await nc.close()


@pytest.fixture
def served(tmp_path: Path, nats_server: NatsServer) -> Iterator[Served]:
    asyncio.run(_seed_store(nats_server))
    key = generate_key()
    key_file = tmp_path / "admin.key"
    write_secret(key_file, key)
    port = free_port()
    settings = GatewaySettings(
        port=port,
        api_keys=key_line("admin", "ops", key),
        log_json=False,
        nats_url=nats_server.url,
        nats_user="gateway",
        nats_password_file=nats_server.password_files["gateway"],
    )
    fleet = Fleet(ttl=3600)
    app = create_app(settings, fleet=fleet)
    app.api.state.rollouts.tick_s = 0.05
    app.api.state.rollouts.drain_s = 0.1
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    made = Served(f"http://127.0.0.1:{port}", fleet, key_file)
    made.beat([1])
    yield made
    server.should_exit = True
    thread.join(timeout=15)


def test_start_status_rollback_promote(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert served.run("start", MODEL, "2", "--canary", "25", "--window", "60") == 0
    first = capsys.readouterr().out
    assert "version 2 over 1 (pending)" in first
    rollout_id = first.split()[1]
    assert served.run("status", "--model", MODEL) == 0
    table = capsys.readouterr().out
    assert rollout_id in table and "v2" in table
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        served.beat([1, 2], rollout_id)
        served.run("status", rollout_id)
        if ": canary, 25% of traffic" in capsys.readouterr().out:
            break
        time.sleep(0.1)
    else:
        pytest.fail("never canary")
    assert served.run("rollback", rollout_id) == 0
    out = capsys.readouterr().out
    assert "rolled_back" in out and "reason: rolled back by ops" in out
    # promote after a rollback: the gateway says no, the command fails with its message
    from fedgate.status import ApiError

    with pytest.raises(ApiError, match="only a canary can be promoted"):
        served.run("promote", rollout_id)
    # a new rollout, followed with --wait until promoted by hand (no traffic reaches it here)
    served.beat([1])
    args = ("start", MODEL, "2", "--no-auto-promote", "--wait", "--poll-s", "0.1")
    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(served.run(*args)))
    follower.start()
    second = ""
    for _ in range(100):
        served.run("status", "--model", MODEL)
        rows = capsys.readouterr().out.splitlines()
        second = next(
            (r.split()[0] for r in rows if r.startswith("r-") and rollout_id not in r), ""
        )
        if second:
            break
        time.sleep(0.1)
    served.beat([1, 2], second)
    for _ in range(100):
        served.run("status", second)
        if ": canary" in capsys.readouterr().out:
            break
        time.sleep(0.1)
    assert served.run("promote", second) == 0
    follower.join(timeout=15)
    assert result == [0]
    assert "promoted: promoted by ops" in capsys.readouterr().out


def test_spec_from_options() -> None:
    from fedgate.rollout_cmd import spec_of

    args = build_parser().parse_args(
        ["rollout", "start", MODEL, "3", "--stages", "10,50", "--min-accuracy", "0.9"]
    )
    assert spec_of(args) == {"version": 3, "stages": [10.0, 50.0], "gates": {"min_accuracy": 0.9}}
    args = build_parser().parse_args(
        ["rollout", "start", MODEL, "3", "--max-metric", "40", "--metric-margin", "2.5"]
    )
    assert spec_of(args) == {"version": 3, "gates": {"max_metric": 40.0, "metric_margin": 2.5}}
    args = build_parser().parse_args(["rollout", "start", MODEL, "3", "--no-auto-promote"])
    assert spec_of(args) == {"version": 3, "auto_promote": False}
