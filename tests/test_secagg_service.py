"""Secure aggregation run by the services over a real nats-server with per-role permissions.

A real trainer process (``python -m trainer serve``) and four edge-harness processes
(``tests/secagg_edge.py``: the edge runtime's secure-aggregation participant, without
Triton) run a secure round; one edge is killed with SIGKILL after it shared its keys. The
trainer still releases a version, which must equal version 1 plus the mean of the three
surviving edges' quantised updates, recomputed here from their deterministic deltas. A
sealed envelope sent for the secure round is refused. The start-time refusals (median,
trimmed mean, async rounds, trainer-side clipping) are checked in process and, for one of
them, through the service's exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from fedcore import subjects
from fedcore.errors import ConfigError
from fedcore.params import load_weights_file
from fedcore.secagg import SecAggConfig, round_params
from fedcore.secagg.quantize import dequantize_sum, quantize
from fedcore.subjects import inbox_prefix
from fedcore.transport import UPDATES_STREAM
from fedcore.wire import ROUND_LOG_BUCKET, ROUNDS_BUCKET, RoundAnnouncement, RoundRecord, round_key
from fedgate.keys_cmd import KeyLayout, init_keys
from tests.conftest import NatsServer, processes_mentioning, start_nats
from tests.secagg_edge import harness_delta
from tests.test_trainer_rounds import DIM, send, wait_kv
from tests.transport_harness import trainer_env as base_trainer_env
from trainer.secagg_setup import secagg_configs
from trainer.settings import TrainerSettings

EDGES = ["edge-1", "edge-2", "edge-3", "edge-4"]
VICTIM = "edge-4"
OPTIONS = {"clip_norm": 1.0, "stochastic_rounding": False}  # deterministic: recomputable


def trainer_env(root: Path, keys: KeyLayout, server: NatsServer, **extra: str) -> dict[str, str]:
    return (
        base_trainer_env(
            root,
            keys,
            server.url,
            server.password_files["trainer"],
            ROUND_DEADLINE_S="10",
            SECAGG=json.dumps({"digits": OPTIONS}),
            SECAGG_PHASE_TIMEOUT_S="5",
        )
        | extra
    )


def start_edge(
    root: Path, keys: KeyLayout, server: NatsServer, edge: str, **extra: str
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    env.update(
        {
            "SECAGG_EDGE_ID": edge,
            "SECAGG_EDGE_DIM": str(DIM),
            "SECAGG_EDGE_NATS_URL": server.url,
            "SECAGG_EDGE_PASSWORD_FILE": str(server.password_files[edge]),
            "SECAGG_EDGE_KEY": str(keys.edge_key(edge)),
            "SECAGG_EDGE_REGISTRY": str(keys.registry),
            "SECAGG_EDGE_OPTIONS": json.dumps(OPTIONS),
            "SECAGG_EDGE_LOG": str(root / f"{edge}.steps"),
            **extra,
        }
    )
    log = (root / f"{edge}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.secagg_edge"], env=env, stdout=log, stderr=log
    )


def start_trainer(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (root / "trainer.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve"], env=env, stdout=log, stderr=log
    )


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def steps_seen(path: Path) -> set[str]:
    """The requests an edge harness has received so far (phase names)."""
    if not path.exists():
        return set()
    return {json.loads(line)["phase"] for line in path.read_text().splitlines() if line}


async def wait_for_step(path: Path, phase: str, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if phase in steps_seen(path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path.name} never got {phase}")


async def heartbeats_from(nc: NATS, edges: list[str], within_s: float = 60.0) -> None:
    heard: set[str] = set()
    sub = await nc.subscribe(subjects.HEARTBEAT_ALL)
    deadline = time.monotonic() + within_s
    try:
        while heard != set(edges):
            assert time.monotonic() < deadline, f"heard only {sorted(heard)}"
            with contextlib.suppress(nats.errors.TimeoutError):
                msg = await sub.next_msg(timeout=1)
                heard.add(msg.subject.rsplit(".", 1)[1])
    finally:
        await sub.unsubscribe()


def expected_v2(v1: np.ndarray, survivors: list[str], participants: int) -> np.ndarray:
    """Version 1 plus the mean of the survivors' clipped, quantised updates (FedAvg,
    server_lr 1), computed from the harness's deterministic deltas."""
    params = round_params(SecAggConfig(**OPTIONS), participants)
    total = np.zeros(DIM, dtype=np.uint64)
    for edge in survivors:
        total += quantize(harness_delta(edge, 1, DIM), params).astype(np.uint64)
    mean = dequantize_sum(total.astype(np.uint32), len(survivors), params) / len(survivors)
    return (v1.astype(np.float64) + mean).astype(np.float32)


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_nats(tmp_path / "nats", ["trainer", "gateway", *EDGES], roles=True)
    yield server
    server.process.stop()


@pytest.mark.timeout(180)
async def test_a_secure_round_survives_a_killed_edge(
    tmp_path: Path, secure_nats: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    hold = {VICTIM: {"SECAGG_EDGE_HOLD": "1"}}
    edges = {e: start_edge(tmp_path, keys, secure_nats, e, **hold.get(e, {})) for e in EDGES}
    nc = await nats.connect(
        secure_nats.url,
        user="trainer",
        password=secure_nats.users["trainer"],
        inbox_prefix=inbox_prefix("trainer"),
    )
    await heartbeats_from(nc, EDGES)  # every edge is up before the trainer samples them
    trainer = start_trainer(tmp_path, trainer_env(tmp_path, keys, secure_nats))
    edge_nc = await nats.connect(
        secure_nats.url,
        user="edge-1",
        password=secure_nats.users["edge-1"],
        inbox_prefix=inbox_prefix("edge-1"),
    )
    js = nc.jetstream()
    try:

        def secure_round(raw: bytes) -> RoundAnnouncement | None:
            a = RoundAnnouncement.decode(raw)
            return a if a.round == 1 and a.secure else None

        a1 = await wait_kv(js, ROUNDS_BUCKET, "digits", secure_round, within_s=120)
        assert a1.sampled == EDGES
        # an edge that sends its update as a sealed envelope anyway: refused, not folded
        await send(edge_nc, keys, "edge-1", a1, np.full(DIM, 0.5, np.float32), 10)
        await wait_for_step(tmp_path / f"{VICTIM}.steps", "DELIVERY")  # keys shared
        edges[VICTIM].send_signal(signal.SIGKILL)
        edges[VICTIM].wait(timeout=10)

        record: RoundRecord = await wait_kv(
            js, ROUND_LOG_BUCKET, round_key("digits", 1), RoundRecord.decode, within_s=60
        )
        assert record.outcome == "released", record
        assert record.secure and (record.survivors, record.dropped) == (3, 1)
        survivors = sorted(c.edge_id for c in record.contributors)
        assert survivors == ["edge-1", "edge-2", "edge-3"]
        assert all(c.samples == 0 and c.weight == 1.0 for c in record.contributors)

        artifacts = tmp_path / "trainer" / "artifacts" / "digits"
        v1 = load_weights_file(artifacts / "1" / "weights.npy")
        v2 = load_weights_file(artifacts / "2" / "weights.npy")
        np.testing.assert_allclose(v2, expected_v2(v1, survivors, len(EDGES)), rtol=0, atol=1e-6)
        # which is the mean of the clipped updates, to within the quantisation step
        deltas = [harness_delta(e, 1, DIM).astype(np.float64) for e in survivors]
        clipped = [d / max(1.0, float(np.linalg.norm(d))) for d in deltas]
        np.testing.assert_allclose(v2 - v1, np.mean(clipped, axis=0), rtol=0, atol=1e-6)

        log = (tmp_path / "trainer.log").read_text()
        assert "securely aggregated: sealed updates are refused" in log
        info = await js.stream_info(UPDATES_STREAM)
        assert info.state.messages == 1  # the test's own envelope: no edge sent one
    finally:
        await edge_nc.close()
        await nc.close()
        stop_all([trainer, *edges.values()])
    assert trainer.returncode == 0
    assert processes_mentioning(f"{sys.executable} -m tests.secagg_edge") == []


@pytest.mark.timeout(180)
async def test_a_secure_round_survives_an_edge_that_spoils_a_share(
    tmp_path: Path, secure_nats: NatsServer
) -> None:
    """Issue #16 finding 8: edge-4 sends edge-1 a share that does not open, and its own
    masked input as usual. Failed before: edge-1 refused the round (bad-share) and became
    the dropout, so the trainer released the mean of edge-2, edge-3 and the culprit. Now
    edge-1 excludes edge-4, the trainer drops it and releases the mean of the honest
    three (recomputed here from their deterministic deltas)."""
    keys = init_keys(tmp_path / "keys", EDGES)
    culprit = {VICTIM: {"SECAGG_EDGE_SPOIL_SHARE_TO": "edge-1"}}
    edges = {e: start_edge(tmp_path, keys, secure_nats, e, **culprit.get(e, {})) for e in EDGES}
    nc = await nats.connect(
        secure_nats.url,
        user="trainer",
        password=secure_nats.users["trainer"],
        inbox_prefix=inbox_prefix("trainer"),
    )
    trainer: subprocess.Popen[bytes] | None = None
    try:
        await heartbeats_from(nc, EDGES)
        trainer = start_trainer(tmp_path, trainer_env(tmp_path, keys, secure_nats))
        record: RoundRecord = await wait_kv(
            nc.jetstream(),
            ROUND_LOG_BUCKET,
            round_key("digits", 1),
            RoundRecord.decode,
            within_s=150,
        )
        assert record.outcome == "released", record
        assert record.secure and (record.survivors, record.dropped) == (3, 1)
        survivors = sorted(c.edge_id for c in record.contributors)
        assert survivors == ["edge-1", "edge-2", "edge-3"]
        artifacts = tmp_path / "trainer" / "artifacts" / "digits"
        v1 = load_weights_file(artifacts / "1" / "weights.npy")
        v2 = load_weights_file(artifacts / "2" / "weights.npy")
        np.testing.assert_allclose(v2, expected_v2(v1, survivors, len(EDGES)), rtol=0, atol=1e-6)
        log = (tmp_path / "trainer.log").read_text()
        assert "edge caught misbehaving" in log and "its share to edge-1 did not open" in log
        assert "neighbour excluded" in (tmp_path / "edge-1.log").read_text()
    finally:
        await nc.close()
        stop_all([*([trainer] if trainer is not None else []), *edges.values()])
    assert processes_mentioning(f"{sys.executable} -m tests.secagg_edge") == []


def settings(tmp_path: Path, **extra: Any) -> TrainerSettings:
    values: dict[str, Any] = {
        "nats_user": "trainer",
        "nats_password_file": tmp_path / "p",
        "data_dir": tmp_path,
        "signing_key_file": tmp_path / "s.key",
        "hpke_private_key_file": tmp_path / "h.key",
        "edge_registry_file": tmp_path / "r.json",
        "secagg": {"digits": {"clip_norm": 1.0}},
    }
    values.update(extra)
    return TrainerSettings(**values)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strategy": "median", "strategy_options": {}}, "coordinate-wise median needs every"),
        ({"strategy": "trimmed_mean", "strategy_options": {"beta": 0.1}}, "trimmed mean sorts"),
        ({"strategy": "clipping", "strategy_options": {"max_norm": 1.0}}, "trainer-side clipping"),
        ({"round_mode": "async"}, "round_mode 'async'"),
        ({"secagg": {"other": {}}}, "does not serve"),
    ],
)
def test_incompatible_settings_are_refused(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        secagg_configs(settings(tmp_path, **extra))


def test_sum_strategies_and_central_dp_are_accepted(tmp_path: Path) -> None:
    for strategy in ["fedavg", "fedavgm", "fedadam", "fedprox", "dp_fedavg"]:
        configs = secagg_configs(settings(tmp_path, strategy=strategy))
        assert configs == {"digits": SecAggConfig(clip_norm=1.0)}
    assert secagg_configs(settings(tmp_path, secagg={})) == {}


def test_the_service_exits_with_the_reason(tmp_path: Path, nats_server: NatsServer) -> None:
    keys = init_keys(tmp_path / "keys", ["edge-1"])
    env = trainer_env(
        tmp_path,
        keys,
        nats_server,
        FEDGATE_TRAINER_STRATEGY="median",
        FEDGATE_TRAINER_STRATEGY_OPTIONS="{}",
    )
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "serve"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "secure aggregation cannot be combined with strategy 'median'" in err
    assert not (tmp_path / "trainer" / "artifacts").exists()  # refused before bootstrap
