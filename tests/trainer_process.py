"""A real trainer process (``python -m trainer serve``) over a real nats-server, and the
edge-side pieces the process tests drive it with: waiting on its KV entries, sending it
sealed updates from enrolled edge identities."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from edge_runtime.publisher import UpdatePublisher
from fedcore.compression import CompressionSettings, encode_update, sizes_from_layout
from fedcore.envelope import RecipientPublicKey, seal_update
from fedcore.keys import load_ed25519, read_hpke_public
from fedcore.models import get_spec
from fedcore.params import layout, load_weights_file
from fedcore.wire import ROUND_LOG_BUCKET, ROUNDS_BUCKET, RoundAnnouncement, RoundRecord, round_key
from fedgate.keys_cmd import KeyLayout
from tests.conftest import NatsServer
from tests.transport_harness import trainer_env

SIZES = sizes_from_layout(layout(get_spec("digits").build_module()))
DIM = sum(SIZES)
T = TypeVar("T")


def start_trainer(
    root: Path, keys: KeyLayout, nats_server: NatsServer, **settings: str
) -> subprocess.Popen[bytes]:
    """The trainer service as its own process; ``settings`` as in :func:`trainer_env`."""
    password = nats_server.password_files["trainer"]
    env = trainer_env(root, keys, nats_server.url, password, **settings)
    log = (root / "trainer.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve"], env=env, stdout=log, stderr=log
    )


def stop_trainer(trainer: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait (kill after 30 s); the exit status."""
    trainer.send_signal(signal.SIGTERM)
    try:
        return trainer.wait(timeout=30)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


@contextlib.asynccontextmanager
async def trainer_and_edge(
    root: Path, keys: KeyLayout, nats_server: NatsServer, **settings: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], NATS]]:
    """A running trainer and an edge's NATS connection; the trainer must stop cleanly."""
    trainer = start_trainer(root, keys, nats_server, **settings)
    nc = await nats.connect(nats_server.url, user="edge-1", password=nats_server.users["edge-1"])
    try:
        yield trainer, nc
    finally:
        await nc.close()
        status = stop_trainer(trainer)
    assert status == 0, (root / "trainer.log").read_text()[-3000:]


async def wait_kv(
    js: JetStreamContext,
    bucket: str,
    key: str,
    accept: Callable[[bytes], T | None],
    within_s: float = 90.0,
    trainer: subprocess.Popen[bytes] | None = None,
) -> T:
    """The first value of ``bucket/key`` that ``accept`` turns into something not None."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if trainer is not None and trainer.poll() is not None:
            raise AssertionError(f"the trainer exited with status {trainer.returncode}")
        try:
            kv = await js.key_value(bucket)
            entry = await kv.get(key)
            value = accept(entry.value or b"")
            if value is not None:
                return value
        except Exception:  # bucket or key not there yet
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{bucket}/{key} never became what the test waits for")


def open_round(n: int) -> Callable[[bytes], RoundAnnouncement | None]:
    def accept(raw: bytes) -> RoundAnnouncement | None:
        a = RoundAnnouncement.decode(raw)
        return a if a.round == n and a.state == "open" else None

    return accept


def record_of(raw: bytes) -> RoundRecord:
    return RoundRecord.decode(raw)


async def wait_open(
    js: JetStreamContext, n: int, trainer: subprocess.Popen[bytes] | None = None
) -> RoundAnnouncement:
    return await wait_kv(js, ROUNDS_BUCKET, "digits", open_round(n), 120, trainer)


async def wait_record(
    js: JetStreamContext, n: int, trainer: subprocess.Popen[bytes] | None = None
) -> RoundRecord:
    return await wait_kv(js, ROUND_LOG_BUCKET, round_key("digits", n), record_of, 90, trainer)


def released_weights(root: Path, version: int) -> Any:
    directory = root / "trainer" / "artifacts" / "digits" / str(version)
    return load_weights_file(directory / "weights.npy")


async def send(
    nc: NATS,
    keys: KeyLayout,
    edge: str,
    a: RoundAnnouncement,
    delta: np.ndarray,
    samples: int,
    recipient: RecipientPublicKey | None = None,
) -> bytes:
    """Seal ``delta`` (FP32, uncompressed) as ``edge`` for round ``a`` and publish it;
    sealed to the trainer's HPKE public file (its suite) unless ``recipient`` is given."""
    payload = encode_update(delta, SIZES, CompressionSettings(mode="none")).data
    _, envelope = seal_update(
        payload,
        recipient=recipient or read_hpke_public(keys.hpke_pub),
        signer=load_ed25519(keys.edge_key(edge)),
        model="digits",
        round=a.round,
        edge_id=edge,
        base_version=a.base_version,
        base_digest=a.base_digest,
        num_samples=samples,
    )
    await UpdatePublisher.for_connection(nc).publish(envelope)
    return bytes(envelope)
