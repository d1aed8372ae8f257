"""The edge's learner with top-k compression and error feedback, over its real fine-tuning
worker: a failed publish leaves the residual as it was, a published update writes it to
disk, what was sent plus the residual is the whole delta, and a restarted learner
carries the residual on."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_runtime.events import EventLog
from edge_runtime.idle import IdleThresholds
from edge_runtime.learner import RESIDUAL_FILE, Learner, LearnerConfig
from edge_runtime.metrics_poll import TritonLoad
from edge_runtime.rounds_watch import RoundsView, ServedVersion
from edge_runtime.sealer import Keys
from edge_runtime.spool import Spool
from fedcore.compression import CompressionSettings, ErrorFeedback, decode_update
from fedcore.envelope import generate_recipient_key, open_update
from fedcore.errors import TransportError
from fedcore.models import get_spec
from fedcore.triton_model import WEIGHTS_FILE
from tests.conftest import SignedArtifacts
from tests.edge_harness import announcement, v1_digest
from tests.test_edge_finetune import labelled_spool
from tests.trainer_process import DIM, SIZES

FRACTION = 0.05


def make_learner(
    root: Path, signed: SignedArtifacts, spool: Path, outbox: list[bytes], keys: Keys
) -> Learner:
    clock = itertools.count()
    digest = v1_digest(signed)
    rounds = RoundsView()
    rounds.put(announcement(1, 1, digest))
    served = {1: ServedVersion(1, digest, signed.artifacts / "digits" / "1" / WEIGHTS_FILE)}

    async def read_load() -> TritonLoad:  # an edge nobody sends requests to
        return TritonLoad(ts=float(next(clock)), pending=0, requests=0, queue_us=0.0)

    async def read_served() -> Any:
        return served

    async def publish(envelope: bytes) -> None:
        if not outbox:  # the first publish fails, as with the trainer unreachable
            outbox.append(b"")
            raise TransportError("publish-failed", "no ack (test)")
        outbox.append(envelope)

    config = LearnerConfig(
        edge_id="edge-1",
        model="digits",
        work_dir=root / "learner",
        sizes=tuple(SIZES),
        poll_interval_s=0.05,
        thresholds=IdleThresholds(quiet_s=0.0),
        min_new_labels=1,
        nice=0,
        sched_idle=False,
        compression=CompressionSettings(mode="topk", topk_fraction=FRACTION),
        window_budget_s=600.0,
        recipe=get_spec("digits").recipe,
    )
    return Learner(
        config,
        spool=Spool(spool),
        rounds=rounds,
        read_load=read_load,
        read_served=read_served,
        publish=publish,
        keys=keys,
        events=EventLog(),
    )


async def tick_until(learner: Learner, kind: str, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not learner.events.events(kind):
        assert loop.time() < deadline, [e.kind for e in learner.events.events()]
        await learner.tick()
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_residual_is_kept_on_disk_only_after_a_publish(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    trainer = generate_recipient_key()
    keys = Keys(ed25519.Ed25519PrivateKey.generate(), trainer.public_key())
    outbox: list[bytes] = []
    spool = labelled_spool(tmp_path)
    learner = make_learner(tmp_path, signed_v1, spool, outbox, keys)
    residual_file = tmp_path / "learner" / RESIDUAL_FILE
    try:
        await tick_until(learner, "train-abandoned")  # the publish failed
        assert "publish-failed" in str(learner.events.events("train-abandoned")[0].reason)
        assert not residual_file.exists() and not learner.sealer.feedback.residual.any()
        await tick_until(learner, "update-published")  # the same round, trained again
    finally:
        await learner.close()
    header, payload = open_update(
        outbox[-1],
        recipient=trainer,
        edge_keys={"edge-1": keys.signer.public_key()}.get,
        max_payload=1 << 22,
    )
    assert header.compression == "topk"
    sent = decode_update(payload, "topk", SIZES)
    assert np.count_nonzero(sent) == math.ceil(FRACTION * DIM)
    residual = ErrorFeedback.load(residual_file, DIM).residual
    assert np.array_equal(residual, learner.sealer.feedback.residual)
    assert not residual[sent != 0].any()  # what was sent is not owed any more
    # sent + residual is the whole delta: its norm is the one the signed metrics report
    whole = float(np.linalg.norm((sent + residual).astype(np.float64)))
    assert header.metrics is not None
    assert whole == pytest.approx(header.metrics["delta_norm"], rel=1e-5)
    assert float(np.linalg.norm(sent)) < 0.9 * whole
    restarted = make_learner(tmp_path, signed_v1, spool, [b""], keys)
    try:
        np.testing.assert_array_equal(restarted.sealer.feedback.residual, residual)
    finally:
        await restarted.close()
