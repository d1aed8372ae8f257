"""The fleet simulator of ``benchmarks/fleet_scale.py`` against the real trainer process:
50 simulated enrolled edges heartbeat, are invited, and complete rounds (so the simulator
the scale figures come from keeps speaking the protocol the trainer speaks)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from benchmarks.fleet_scale import start_trainer, wait_open, wait_record
from benchmarks.fleet_sim import SimFleet, edge_names, enroll_fleet, seal_round
from fedcore.compression import sizes_from_layout
from fedcore.models.wide import wide_spec
from fedcore.params import layout
from tests.conftest import NatsServer
from tests.trainer_process import stop_trainer

pytestmark = pytest.mark.slow

EDGES = 50
HIDDEN = 32


async def two_rounds(root: Path, server: NatsServer) -> None:
    edges = edge_names(EDGES)
    keys = enroll_fleet(root / "keys", edges)
    sizes = sizes_from_layout(layout(wide_spec(HIDDEN).build_module()))
    password = server.users["edge-1"]
    fleet = await SimFleet.connect(
        server.url, "edge-1", password, edges, "wide", connections=5, interval_s=0.2
    )
    nc = await nats.connect(server.url, user="edge-1", password=password)
    fleet.start_heartbeats()
    trainer = start_trainer(
        root, keys, server.url, server.password_files["trainer"], HIDDEN, EDGES, 2, replicas=1
    )
    try:
        js = nc.jetstream()
        for r in (1, 2):
            a = await wait_open(js, r, 120)
            if r == 2:  # heard every simulated edge's heartbeat: all of them invited
                assert a.sampled == sorted(edges)
            # sealed off the event loop: the edges keep beating meanwhile
            files = await asyncio.to_thread(seal_round, keys, edges, a, sizes, root / "sealed", 1)
            await fleet.publish(files)
            record = await wait_record(js, r, 120)
            assert record.outcome == "released", record.reason
            assert sorted(c.edge_id for c in record.contributors) == sorted(edges)
            assert record.released_version == r + 1
        assert fleet.beats_sent >= EDGES
    finally:
        await nc.close()
        await fleet.close()
        status = stop_trainer(trainer)
    assert status == 0, (root / "trainer.log").read_text()[-3000:]


def test_fifty_simulated_edges_complete_rounds(tmp_path: Path, nats_server: NatsServer) -> None:
    asyncio.run(asyncio.wait_for(two_rounds(tmp_path, nats_server), 400))
