"""Updates at the edges of a round's life are counted once or refused, never lost.

Found by ``benchmarks/chaos.py``: an update the ingestor accepted (ledger record written,
message acknowledged) was missing from its round's record in two ways.

1. Closing a round takes seconds (candidate, gate, ONNX export, signing, upload) and the
   ingestor kept folding into the round meanwhile: an update accepted after the round's
   contributors were taken was in the ledger but in no aggregate.
2. An update published while the trainer was down, before its round's deadline: the
   restarted trainer closed the round (deadline passed) before reading the stream, so
   the update came too late for it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import nats
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.models import get_spec
from fedcore.transport import TRAINER_CONSUMER, UPDATES_STREAM
from fedgate.keys_cmd import init_keys
from tests.conftest import NatsServer
from tests.trainer_process import (
    DIM,
    SIZES,
    send,
    start_trainer,
    stop_trainer,
    wait_open,
    wait_record,
)
from trainer.bootstrap import train_seed_model
from trainer.driver import RoundDriver
from trainer.errors import UpdateRejected
from trainer.release import ReleaseContext, close_round
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy


async def test_an_update_arriving_while_its_round_closes_is_refused_not_lost(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    spec = get_spec("digits")
    params = train_seed_model(spec, fraction=0.05, epochs=1, seed=0)
    _, _, x, y = spec.dataset()
    key = ed25519.Ed25519PrivateKey.generate()
    state = tmp_path / "state"
    state.mkdir()
    ctx = ReleaseContext(spec, key, tmp_path / "artifacts", 1.0, x, y)
    policy, strategy = RoundPolicy(min_updates=1), get_strategy("fedavg")
    book = RoundBook("digits", policy, strategy, version=1, digest="ab" * 32, params=params)
    driver = RoundDriver({"digits": book}, state, {"digits": SIZES})
    rng = np.random.default_rng(0)
    book.open(["edge-1", "edge-2"])
    book.fold(Contribution("a" * 32, "edge-1", 10, 1, 0.0), rng.normal(0, 1e-3, DIM))
    nc = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    try:
        closing = asyncio.create_task(close_round(ctx, book, nc.jetstream()))
        await asyncio.sleep(0)  # close_round runs up to its first await (the candidate)
        assert not closing.done()
        target_while_closing = driver.target("digits")
        accepted = ["edge-1"]
        try:
            book.fold(Contribution("b" * 32, "edge-2", 10, 1, 0.0), rng.normal(0, 1e-3, DIM))
            accepted.append("edge-2")
        except UpdateRejected as exc:
            assert exc.reason == "round-closed"
        record = await closing
    finally:
        await nc.close()
    # every update the round accepted is in its record: nothing accepted and dropped
    assert sorted(c.edge_id for c in record.contributors) == accepted
    assert accepted == ["edge-1"] and target_while_closing is None  # refused, not accepted
    assert record.closed_ts < time.time()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_an_update_sent_while_the_trainer_was_down_is_counted_after_the_deadline(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", ["edge-1", "edge-2"])
    settings = {"MIN_UPDATES": "2", "ROUND_DEADLINE_S": "20"}
    trainer = start_trainer(tmp_path, keys, nats_server, **settings)
    nc = await nats.connect(nats_server.url, user="edge-1", password=nats_server.users["edge-1"])
    js = nc.jetstream()
    rng = np.random.default_rng(1)
    try:
        a1 = await wait_open(js, 1, trainer)
        await send(nc, keys, "edge-1", a1, rng.normal(0, 1e-3, DIM).astype(np.float32), 10)
        await asyncio.sleep(1.5)  # accepted and checkpointed
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        # edge-2's update reaches JetStream before the deadline, while no trainer runs
        await send(nc, keys, "edge-2", a1, rng.normal(0, 1e-3, DIM).astype(np.float32), 10)
        assert time.time() < a1.deadline_ts
        await asyncio.sleep(max(0.0, a1.deadline_ts - time.time()) + 0.5)
        trainer = start_trainer(tmp_path, keys, nats_server, **settings)
        record = await wait_record(js, 1, trainer)
        assert record.outcome == "released", record.reason
        assert sorted(c.edge_id for c in record.contributors) == ["edge-1", "edge-2"]
    finally:
        await nc.close()
        if trainer.poll() is None:
            assert stop_trainer(trainer) == 0, (tmp_path / "trainer.log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_an_update_the_killed_trainer_had_fetched_is_counted_after_the_deadline(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The chaos run's third way: the trainer fetched edge-2's update and died before acking
    it; JetStream redelivers it only after the ack wait, and the restarted trainer closed
    the round at its deadline before that. Here the test holds the message unacked (as the
    killed trainer did), and the round must wait for its redelivery."""
    keys = init_keys(tmp_path / "keys", ["edge-1", "edge-2"])
    settings = {"MIN_UPDATES": "2", "ROUND_DEADLINE_S": "15", "UPDATES_ACK_WAIT_S": "20"}
    trainer = start_trainer(tmp_path, keys, nats_server, **settings)
    nc = await nats.connect(nats_server.url, user="edge-1", password=nats_server.users["edge-1"])
    thief = await nats.connect(
        nats_server.url, user="trainer", password=nats_server.users["trainer"]
    )
    js = nc.jetstream()
    rng = np.random.default_rng(2)
    try:
        a1 = await wait_open(js, 1, trainer)
        await send(nc, keys, "edge-1", a1, rng.normal(0, 1e-3, DIM).astype(np.float32), 10)
        await asyncio.sleep(1.5)  # accepted and checkpointed
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        await send(nc, keys, "edge-2", a1, rng.normal(0, 1e-3, DIM).astype(np.float32), 10)
        held = await thief.jetstream().pull_subscribe_bind(
            durable=TRAINER_CONSUMER, stream=UPDATES_STREAM
        )
        (fetched,) = await held.fetch(1, timeout=10)  # delivered, never acked
        assert fetched.subject.endswith(".edge-2")
        await asyncio.sleep(max(0.0, a1.deadline_ts - time.time()) + 0.5)
        trainer = start_trainer(tmp_path, keys, nats_server, **settings)
        record = await wait_record(js, 1, trainer)
        assert record.outcome == "released", record.reason
        assert sorted(c.edge_id for c in record.contributors) == ["edge-1", "edge-2"]
    finally:
        await thief.close()
        await nc.close()
        if trainer.poll() is None:
            assert stop_trainer(trainer) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
