"""The nats-server fixture: auth enforced, JetStream on, stopped cleanly."""

from __future__ import annotations

import nats
import pytest
from nats.errors import NoServersError

from tests.conftest import NatsServer


async def test_jetstream_works_for_a_user(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    js = nc.jetstream()
    await js.add_stream(name="PROBE", subjects=["probe.>"])
    ack = await js.publish("probe.x", b"hello")
    assert ack.seq == 1
    await nc.close()


async def test_wrong_password_is_refused(nats_server: NatsServer) -> None:
    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(
            nats_server.url,
            user="trainer",
            password="wrong",
            max_reconnect_attempts=0,
            connect_timeout=2,
            allow_reconnect=False,
        )
