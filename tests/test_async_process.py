"""Buffered async rounds in a real trainer process over a real nats-server (issue #18):
three edges of different speeds. The two fast ones send into every buffer; the slow one
trains from version 1 and sends after the trainer has moved on. A buffer that is not full
closes at its timeout with MIN_UPDATES; the stale update joins the next buffer weighted
by ``staleness_weight``; the announcement tells edges the strategy's mu and the trainer's
local recipe, and the round record says so."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedcore.wire import ClientRecipe
from fedgate.keys_cmd import init_keys
from tests.conftest import NatsServer
from tests.trainer_process import (
    DIM,
    released_weights,
    send,
    trainer_and_edge,
    wait_open,
    wait_record,
)
from trainer.rounds import staleness_weight

pytestmark = pytest.mark.slow
EDGES = ["edge-1", "edge-2", "edge-3"]


@pytest.mark.timeout(240)
async def test_async_buffers_close_on_timeout_and_take_a_stale_straggler(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    keys = init_keys(tmp_path / "keys", EDGES)
    settings = {
        "ROUND_MODE": "async",
        "BUFFER_SIZE": "3",
        "MIN_UPDATES": "2",
        "ROUND_DEADLINE_S": "3",
        "MAX_STALENESS": "2",
        "STRATEGY": "fedprox",
        "STRATEGY_OPTIONS": '{"mu": 0.2}',
        "LOCAL_MAX_STEPS": "5",
    }
    rng = np.random.default_rng(7)
    async with trainer_and_edge(tmp_path, keys, nats_server, **settings) as (trainer, nc):
        js = nc.jetstream()
        a1 = await wait_open(js, 1, trainer)
        told = ClientRecipe(proximal_mu=0.2, max_steps=5)
        assert a1.mode == "async" and a1.recipe == told
        assert (a1.buffer_size, a1.min_updates, a1.deadline_ts - a1.opened_ts) == (3, 2, 3.0)

        # the fast edges send; the slow one is still training from version 1
        for edge in EDGES[:2]:
            await send(nc, keys, edge, a1, rng.normal(0, 1e-3, DIM).astype(np.float32), 20)
        sent = time.monotonic()
        r1 = await wait_record(js, 1, trainer)  # before: the trainer waited forever
        assert time.monotonic() - sent < 60
        assert r1.outcome == "released" and r1.released_version == 2 and r1.mode == "async"
        assert sorted(c.edge_id for c in r1.contributors) == EDGES[:2]
        assert r1.recipe == told

        a2 = await wait_open(js, 2, trainer)
        assert a2.base_version == 2
        stale = a2.model_copy(update={"base_version": 1, "base_digest": a1.base_digest})
        deltas = [rng.normal(0, 1e-3, DIM).astype(np.float32) for _ in EDGES]
        await send(nc, keys, "edge-3", stale, deltas[2], 20)  # based on v1: stale by 1
        await send(nc, keys, "edge-1", a2, deltas[0], 20)
        await send(nc, keys, "edge-2", a2, deltas[1], 20)
        r2 = await wait_record(js, 2, trainer)
        assert r2.outcome == "released" and r2.released_version == 3
        weights = {c.edge_id: (c.base_version, c.weight) for c in r2.contributors}
        assert weights["edge-3"] == (1, pytest.approx(staleness_weight(20, 1, 0.5)))
        assert weights["edge-1"] == (2, 20.0) and weights["edge-2"] == (2, 20.0)
        w = [20.0, 20.0, staleness_weight(20, 1, 0.5)]
        expected = released_weights(tmp_path, 2) + sum(
            wi * d for wi, d in zip(w, deltas, strict=True)
        ) / sum(w)
        np.testing.assert_allclose(released_weights(tmp_path, 3), expected, atol=1e-6)
