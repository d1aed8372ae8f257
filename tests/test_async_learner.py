"""The edge's learner over its real fine-tuning worker in an async round (issue #18): a
job trained from version 1 is not abandoned when the trainer moves on to the next buffer
past its timeout; its update is sealed for the buffer open then, on its own base, and its
signed metrics say it trained with the trainer's recipe, not the edge's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_runtime.sealer import Keys
from fedcore.envelope import generate_recipient_key, open_update
from fedcore.wire import ClientRecipe
from tests.conftest import SignedArtifacts
from tests.edge_harness import announcement, v1_digest
from tests.test_edge_finetune import labelled_spool
from tests.test_learner_residual import make_learner, tick_until


@pytest.mark.timeout(180)
async def test_a_stale_async_job_is_sent_into_the_open_buffer(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    trainer = generate_recipient_key()
    keys = Keys(ed25519.Ed25519PrivateKey.generate(), trainer.public_key())
    outbox: list[bytes] = []
    learner = make_learner(tmp_path, signed_v1, labelled_spool(tmp_path), [b""], keys)

    async def publish(envelope: bytes | bytearray) -> None:
        outbox.append(bytes(envelope))

    learner.publish = publish
    told = ClientRecipe(proximal_mu=0.3, epochs=50, max_steps=60, lr=0.01)
    now = time.time()
    first = announcement(1, 1, v1_digest(signed_v1)).model_copy(
        update={"mode": "async", "max_staleness": 2, "buffer_size": 3, "recipe": told}
    )
    learner.rounds.put(first)
    try:
        while learner.job is None:
            await learner.tick()
            await asyncio.sleep(0.05)
        # the trainer closed buffer 1 at its timeout and opened buffer 2 on version 2
        second = first.model_copy(
            update={
                "round": 2,
                "base_version": 2,
                "base_digest": "cd" * 32,
                "opened_ts": now - 20,
                "deadline_ts": now - 10,
            }
        )
        learner.rounds.put(second)
        await tick_until(learner, "update-published", timeout_s=150)
    finally:
        await learner.close()
    # before: the job was abandoned (round-changed) and nothing reached the trainer
    assert learner.events.events("train-abandoned") == []
    header, _ = open_update(
        outbox[-1],
        recipient=trainer,
        edge_keys={"edge-1": keys.signer.public_key()}.get,
        max_payload=1 << 22,
    )
    assert (header.round, header.base_version) == (2, 1)
    assert header.metrics is not None
    used = {k: v for k, v in header.metrics.items() if k.startswith("recipe_")}
    assert used == {
        "recipe_mu": 0.3,
        "recipe_lr": 0.01,
        "recipe_epochs": 50.0,
        "recipe_batch_size": 32.0,
        "recipe_max_steps": 60.0,
    }
    assert {1, 2} <= learner.sent_rounds()
    published = learner.events.events("update-published")[0]
    assert published.batch == 60  # the trainer's step bound, not 50 epochs
