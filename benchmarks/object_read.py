"""Reading a large update from the object store: the trainer's own chunk reader against
nats-py's ``ObjectStore.get(writeinto=...)`` (what ``StoreObjects`` used before it read the
chunks itself, #objread), on one real nats-server with the deployment's permissions.

Both read the same 64 MiB object, written by an edge, three times each, interleaved; it
prints each pair and the ratio (ours / nats-py's) measured in the same run.

Run: ``.venv/bin/python benchmarks/object_read.py`` (seconds).
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

import nats
from nats.aio.client import Client as NATS

from fedcore.subjects import inbox_prefix
from fedcore.transport import UPDATES_OBJECT_BUCKET, StreamSpec, UpdatePointer
from tests.conftest import NatsServer, start_nats
from trainer.bus import ensure_transport
from trainer.opener import StoreObjects

SIZE = 64 * 1024 * 1024


async def measure(server: NatsServer) -> None:
    async def connect(user: str) -> NATS:
        return await nats.connect(
            server.url,
            user=user,
            password=server.users[user],
            inbox_prefix=inbox_prefix(user),
        )

    trainer, edge = await connect("trainer"), await connect("edge-1")
    try:
        js = trainer.jetstream()
        await ensure_transport(js, StreamSpec(max_msg_size=trainer.max_payload))
        data = bytes(range(256)) * (SIZE // 256)
        name = "digits/edge-1/" + "a" * 32
        await (await edge.jetstream().object_store(UPDATES_OBJECT_BUCKET)).put(name, data)
        pointer = UpdatePointer.for_envelope(data, UPDATES_OBJECT_BUCKET, name)
        store = await js.object_store(UPDATES_OBJECT_BUCKET)
        for _ in range(3):
            started = time.perf_counter()
            ours = await StoreObjects(js, 120).read(pointer)
            own = time.perf_counter() - started
            sink = io.BytesIO()
            started = time.perf_counter()
            await store.get(name, writeinto=sink)
            theirs = time.perf_counter() - started
            assert ours == data and sink.getvalue() == data
            print(
                f"{SIZE >> 20} MiB: StoreObjects {own:.2f} s, nats-py get(writeinto) "
                f"{theirs:.2f} s, ratio {own / theirs:.2f}"
            )
    finally:
        await edge.close()
        await trainer.close()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="object-read-"))
    server = start_nats(root, ["trainer", "edge-1"], roles=True)
    try:
        asyncio.run(measure(server))
    finally:
        server.process.stop()


if __name__ == "__main__":
    main()
