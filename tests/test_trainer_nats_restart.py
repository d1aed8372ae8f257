"""The trainer rides out a nats-server restart (found by ``tests/test_chaos.py``): its
round loop wrote a round record or an announcement while the broker was down, the write
timed out and the trainer process exited (the launcher restarted it). Now those
idempotent writes are retried with backoff (``trainer/retry.py``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from fedcore.wire import ROUNDS_BUCKET, RoundAnnouncement
from fedgate.keys_cmd import init_keys
from tests.conftest import NatsServer
from tests.trainer_process import start_trainer, stop_trainer, wait_kv, wait_open


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_trainer_rides_out_a_nats_restart(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", ["edge-1"])
    # no edge sends anything: every round fails at its 1 s deadline and the next opens,
    # so the trainer writes to NATS every second, the outage included
    settings = {"MIN_UPDATES": "1", "ROUND_DEADLINE_S": "1"}
    trainer = start_trainer(tmp_path, keys, nats_server, **settings)
    nc = await nats.connect(
        nats_server.url,
        user="edge-1",
        password=nats_server.users["edge-1"],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
    )
    js = nc.jetstream()
    try:
        await wait_open(js, 2, trainer)
        nats_server.process.kill()
        await asyncio.sleep(8.0)  # longer than a JetStream request's 5 s timeout
        assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-2000:]
        nats_server.process.start()  # same store, same port

        def round_number(raw: bytes) -> int | None:
            return RoundAnnouncement.decode(raw).round

        now = await wait_kv(js, ROUNDS_BUCKET, "digits", round_number, 60, trainer)
        await wait_open(js, now + 2, trainer)  # rounds go on after the restart
        assert trainer.poll() is None
    finally:
        await nc.close()
        if trainer.poll() is None:
            assert stop_trainer(trainer) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
