"""An edge-harness process for secure rounds: the edge runtime's secure-aggregation
participant (:class:`edge_runtime.secagg_round.SecAggParticipant`), its round watcher and
a heartbeat, without Triton or fine-tuning (their part is a deterministic update).

``python -m tests.secagg_edge`` with ``SECAGG_EDGE_*`` variables. In every securely
aggregated round that invites it, the edge hands over :func:`harness_delta` (unless
``SECAGG_EDGE_HOLD`` is set: it then takes part in the protocol but never trains, as an
edge that is about to die). With ``SECAGG_EDGE_SPOIL_SHARE_TO=<edge>`` it misbehaves: the
encrypted share it sends that edge is spoiled on its way out (one ciphertext byte
flipped), everything else it does by the protocol. Each request it receives is appended
to ``SECAGG_EDGE_LOG`` as a JSON line ``{"round", "phase"}`` so a test can tell how far
it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from numpy.typing import NDArray

from edge_runtime.rounds_watch import RoundsView, watch_rounds
from edge_runtime.secagg_round import SecAggParticipant, SecAggRoundError, nats_request
from fedcore import subjects
from fedcore.enrollment import load_registry
from fedcore.keys import load_ed25519, read_secret
from fedcore.secagg import ShareBundle
from fedcore.secagg.frame import Frame, Phase
from fedcore.secagg.options import SecAggOptions
from fedcore.subjects import inbox_prefix
from fedcore.wire import Heartbeat

MODEL = os.environ.get("SECAGG_EDGE_MODEL", "digits")


def harness_delta(edge: str, round_no: int, dim: int) -> NDArray[np.float32]:
    """The update ``edge`` sends in round ``round_no`` (norm about 1.4: it gets clipped)."""
    rng = np.random.default_rng([round_no, int(edge.rsplit("-", 1)[1])])
    return rng.normal(0.0, 0.02, dim).astype(np.float32)


def spoil_share(data: bytes, recipient: str) -> bytes:
    """``data`` with the share for ``recipient`` spoiled, if it is a frame of shares."""
    frame = Frame.decode(data)
    if frame.phase is not Phase.SHARES:
        return data
    bundle = ShareBundle.from_bytes(frame.body)
    items = tuple(
        dataclasses.replace(s, ciphertext=bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:])
        if s.recipient == recipient
        else s
        for s in bundle.shares
    )
    body = ShareBundle(bundle.round_id, bundle.edge, items).to_bytes()
    return Frame(frame.phase, frame.round, body).encode()


def record_step(path: Path, data: bytes) -> None:
    """Append the request in ``data`` to the harness's step log."""
    with contextlib.suppress(Exception):
        frame = Frame.decode(data)
        with path.open("a") as f:
            f.write(json.dumps({"round": frame.round, "phase": frame.phase.name}) + "\n")


async def main() -> None:
    env = os.environ
    edge, dim = env["SECAGG_EDGE_ID"], int(env["SECAGG_EDGE_DIM"])
    hold = bool(env.get("SECAGG_EDGE_HOLD"))
    log_path = Path(env["SECAGG_EDGE_LOG"])
    nc = await nats.connect(
        env["SECAGG_EDGE_NATS_URL"],
        user=edge,
        password=read_secret(Path(env["SECAGG_EDGE_PASSWORD_FILE"])),
        inbox_prefix=inbox_prefix(edge),
    )
    registry = Path(env["SECAGG_EDGE_REGISTRY"])
    options = SecAggOptions.model_validate_json(env["SECAGG_EDGE_OPTIONS"])
    view, stop = RoundsView(), asyncio.Event()

    spoil_to = env.get("SECAGG_EDGE_SPOIL_SHARE_TO")

    async def send(subject: str, data: bytes) -> None:
        await nc.publish(subject, data if spoil_to is None else spoil_share(data, spoil_to))

    participant = SecAggParticipant(
        edge,
        load_ed25519(Path(env["SECAGG_EDGE_KEY"])),
        lambda: load_registry(registry).active_keys(),
        {MODEL: options.config()},
        view,
        send,
        max_message=nc.max_payload,
        request=nats_request(nc),
    )

    async def on_message(msg: Msg) -> None:
        record_step(log_path, msg.data)
        await participant.on_message(msg)

    await nc.subscribe(subjects.secagg_to_edge(MODEL, edge), cb=on_message)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(watch_rounds(nc.jetstream(), view, stop, retry_s=0.5))
    beating = asyncio.create_task(beat(nc, edge, stop))  # apart: a large submit takes long
    submitted: set[int] = set()
    while not stop.is_set():
        a = view.get(MODEL)
        if not hold and a is not None and a.secure and a.round not in submitted:
            with contextlib.suppress(SecAggRoundError):  # setup not here yet: next tick
                await participant.submit(MODEL, a.round, harness_delta(edge, a.round, dim))
                submitted.add(a.round)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.3)
    await watcher
    await beating
    await nc.drain()


async def beat(nc: NATS, edge: str, stop: asyncio.Event) -> None:
    """Heartbeats every 0.3 s until ``stop``, as the edge runtime's own task sends them."""
    seq = 0
    while not stop.is_set():
        seq += 1
        hb = Heartbeat(edge_id=edge, url="http://127.0.0.1:9", seq=seq, ts=time.time(), models={})
        await nc.publish(subjects.heartbeat(edge), hb.encode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.3)


if __name__ == "__main__":
    asyncio.run(main())
