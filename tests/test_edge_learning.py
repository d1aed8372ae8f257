"""The learning loop end to end against a real tritonserver, nats-server, gateway and worker.

Labelled traffic is served through the gateway, captured by ``model.py`` into the edge's
spool, joined with feedback sent to ``POST /v1/feedback``; an idle window trains from the
served version, a burst of traffic pauses training within one mini-batch (asserted from
the learner's events), and the sealed update is accepted by the trainer's ingestor.
Nothing published on NATS holds raw input bytes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from numpy.typing import NDArray

from edge_runtime.events import LearnEvent
from fedcore.models import get_spec
from fedcore.transport import UPDATES_PREFIX
from tests.conftest import NatsServer, SignedArtifacts, processes_mentioning
from tests.edge_harness import Stack, announcement, raw_fragments, running_stack
from trainer.ingest import Disposition

pytestmark = pytest.mark.slow

SAMPLES = 140  # labelled requests; the spool keeps the last 120, the first 20 expire
CAPACITY = 120

SETTINGS = {
    "capture_rate": 1.0,
    "spool_capacity": CAPACITY,
    "idle_poll_interval_s": 0.1,
    "idle_quiet_s": 0.5,
    "idle_window_s": 1.0,
    "idle_max_request_rate": 2.0,
    "min_new_labels": 60,
    "train_epochs": 1500,  # ~18k mini-batches (seconds): long enough to be interrupted
    "train_batch_size": 8,
    "train_lr": 0.01,
    "proximal_mu": 0.01,
    "clip_norm": 50.0,
    "heartbeat_interval_s": 0.5,
    # normal priority: the events are asserted, not the scheduling (a busy CI machine
    # must not starve the worker; benchmarks/idle_training.py measures the priorities)
    "train_nice": 0,
    "train_sched_idle": False,
}


async def wait_event(stack: Stack, kind: str, timeout_s: float, after: int = 0) -> LearnEvent:
    """The next ``kind`` event; on timeout the failure shows every event so far."""
    events = stack.runtime.learning.events
    try:
        return await events.wait_for(kind, timeout_s, after)
    except TimeoutError:
        raise AssertionError(
            f"no {kind} event in {timeout_s}s; events: {events.events()}"
        ) from None


async def serve_labelled(stack: Stack, x: NDArray[Any], y: NDArray[Any]) -> None:
    for i in range(len(y)):
        out = await stack.infer(x[i], f"req-{i}")
        assert out["id"] == f"req-{i}"
    # labels go with their responses' feedback tokens: to the edge that served, no 0.5 s
    # fleet window for a loaded edge to miss (req-26 got a 404 that way)
    assert len(stack.tokens) == len(y)
    await asyncio.sleep(0.2)  # the capture writer flushes every 50 ms
    slots = asyncio.Semaphore(16)

    async def label(i: int) -> int:
        async with slots:
            body = {"model": "digits", "id": f"req-{i}", "label": int(y[i])}
            return (await stack.feedback(body)).status_code

    codes = await asyncio.gather(*(label(i) for i in range(len(y))))
    expired = SAMPLES - CAPACITY
    assert codes == [410] * expired + [200] * CAPACITY


async def check_feedback_errors(stack: Stack) -> None:
    resp = await stack.feedback({"model": "digits", "id": "never-served", "label": 1})
    assert resp.status_code == 404 and "never-served" in resp.json()["error"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "digits", "id": "req-139", "label": 10}, "label"),
        ({"model": "digits", "id": "req-139", "label": "three"}, "label"),
        ({"model": "digits", "id": "req-139", "label": 2, "weight": -1}, "weight"),
        ({"model": "digits", "label": 2}, "id"),
    ]
    for bad, field in cases:
        resp = await stack.feedback(bad)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"].startswith(field), resp.text


def burst(url: str, x: NDArray[Any], requests: int, clients: int = 4) -> None:
    """Traffic straight to Triton from ``clients`` threads (no ids: nothing captured)."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(_: int) -> None:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            for i in range(requests // clients):
                inp = httpclient.InferInput("pixels", [1, 64], "FP32")
                inp.set_data_from_numpy(x[i % len(x) : i % len(x) + 1], binary_data=True)
                client.infer("digits", [inp])
        finally:
            client.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))


async def test_labelled_traffic_becomes_an_accepted_update(
    tmp_path: Path, nats_server: NatsServer, signed_v1: SignedArtifacts
) -> None:
    x_train, y_train, _, _ = get_spec("digits").dataset()
    x, y = x_train[:SAMPLES], y_train[:SAMPLES]
    async with running_stack(tmp_path, nats_server, signed_v1, **SETTINGS) as stack:
        events = stack.runtime.learning.events
        # A round on a version this edge does not serve: refused, not trained.
        await stack.announce(announcement(1, 2, stack.digest))
        await serve_labelled(stack, x, y)
        await check_feedback_errors(stack)
        refused = await wait_event(stack, "round-refused", 10)
        assert (refused.round, refused.reason) == (1, "base-not-served")
        assert events.events("train-started") == []

        # The round on the served version: the idle edge trains.
        await stack.announce(announcement(2, 1, stack.digest))
        started = await wait_event(stack, "train-started", 20)
        assert (started.round, started.base_version, started.device) == (2, 1, "cpu")

        # Traffic returns: the learner pauses the worker before its next mini-batch.
        await asyncio.to_thread(burst, stack.runtime.triton.url, x, 400)
        returned = await wait_event(stack, "traffic-returned", 10, after=started.seq)
        paused = await wait_event(stack, "train-paused", 10, after=started.seq)
        assert returned.batch is not None and paused.batch is not None
        assert returned.seq < paused.seq
        assert paused.batch - returned.batch <= 1  # within one mini-batch
        resumed = await wait_event(stack, "train-resumed", 20, after=paused.seq)
        assert resumed.batch == paused.batch

        published = await wait_event(stack, "update-published", 120, after=resumed.seq)
        assert published.round == 2 and published.num_samples is not None
        outcomes = []
        for _ in range(20):
            outcomes += await stack.ingestor.poll(timeout_s=1.0)
            if outcomes:
                break
        assert [o.disposition for o in outcomes] == [Disposition.ACCEPTED]
        (update,) = stack.folded.updates
        header = update.header
        assert (header.edge_id, header.round, header.base_version) == ("edge-1", 2, 1)
        assert header.base_digest == stack.digest
        assert header.update_id == published.update_id
        assert header.num_samples == published.num_samples
        assert header.metrics is not None
        assert {"loss", "accuracy", "base_accuracy", "holdout", "delta_norm"} <= set(header.metrics)
        norm = float(np.linalg.norm(update.vector))
        assert norm <= 50.0 + 1e-3 and norm > 0
        assert events.events("train-abandoned") == []

        # Nothing on NATS carried a raw input: only the sealed update left the edge.
        messages = list(stack.sniffer.messages)
        assert any(s.startswith(f"{UPDATES_PREFIX}.digits.edge-1") for s, _ in messages)
        fragments = raw_fragments(x)
        leaked = [s for s, data in messages for f in fragments if f in data]
        assert leaked == []
    assert processes_mentioning(str(tmp_path / "edge")) == []
