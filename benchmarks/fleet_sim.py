"""Simulated edges that speak the real protocol to the real trainer, without Triton.

A :class:`SimFleet` is N enrolled edge identities (one registry, one Ed25519 key each,
made with :mod:`fedgate.keys_cmd`), a few NATS connections shared by them, and:

- :meth:`SimFleet.heartbeat`: every edge heartbeats on its own subject
  ``fedgate.fleet.heartbeat.<edge>`` with a :class:`fedcore.wire.Heartbeat` naming itself,
  as an enrolled edge does (the trainer and the gateway ignore the others);
- :func:`seal_round`: every edge's update for an announced round, sealed with
  :func:`fedcore.envelope.seal_update` in a process pool (sealing 1,000 updates of 1M
  parameters takes minutes of CPU, so benchmarks seal before they time anything) and
  written to one file per edge;
- :meth:`SimFleet.publish`: the sealed files published with the edge runtime's own
  :class:`edge_runtime.publisher.UpdatePublisher` (inline, or through the object store
  when an envelope is over the server's message limit), a bounded number at a time.

Edges share connections (``connections``, default at most 20) so that 1,000 of them fit
in one process on a small machine; what goes over each connection is what each edge would
send. Used by ``benchmarks/fleet_scale.py`` and ``tests/test_fleet_sim.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nats
import numpy as np
from nats.aio.client import Client as NATS

from edge_runtime.publisher import UpdatePublisher
from fedcore import subjects
from fedcore.compression import CompressionSettings, encode_update
from fedcore.enrollment import load_registry, save_registry
from fedcore.envelope import seal_update
from fedcore.keys import load_ed25519, read_hpke_public
from fedcore.wire import Heartbeat, ModelState, RoundAnnouncement
from fedgate.keys_cmd import KeyLayout, ensure_edge_identity, ensure_trainer_keys


def edge_names(n: int) -> list[str]:
    return [f"sim-{i:04d}" for i in range(n)]


def enroll_fleet(root: Path, edges: Sequence[str]) -> KeyLayout:
    """Trainer keys and one enrolled identity per edge under ``root`` (the registry is
    written once, not once per edge as ``fedgate keys enroll`` does)."""
    layout = KeyLayout(root)
    ensure_trainer_keys(layout, None)
    registry = load_registry(layout.registry, missing_ok=True)
    for edge in edges:
        registry = registry.enroll(edge, ensure_edge_identity(layout, edge))
    save_registry(layout.registry, registry)
    return layout


@dataclass(frozen=True)
class SealJob:
    keys_root: str
    edge: str
    announcement: str  # the encoded RoundAnnouncement
    sizes: tuple[int, ...]
    samples: int
    seed: int
    out: str


def _seal_one(job: SealJob) -> str:
    """Seal one edge's update (a small random step) for the announced round into a file."""
    layout = KeyLayout(Path(job.keys_root))
    a = RoundAnnouncement.decode(job.announcement.encode())
    rng = np.random.default_rng(job.seed)
    delta = (rng.standard_normal(sum(job.sizes), dtype=np.float32) * np.float32(1e-3)).astype(
        np.float32
    )
    payload = encode_update(delta, list(job.sizes), CompressionSettings(mode="none")).data
    _, envelope = seal_update(
        payload,
        recipient=read_hpke_public(layout.hpke_pub),
        signer=load_ed25519(layout.edge_key(job.edge)),
        model=a.model,
        round=a.round,
        edge_id=job.edge,
        base_version=a.base_version,
        base_digest=a.base_digest,
        num_samples=job.samples,
    )
    Path(job.out).write_bytes(envelope)
    return job.out


def seal_round(
    layout: KeyLayout,
    edges: Sequence[str],
    a: RoundAnnouncement,
    sizes: Sequence[int],
    out_dir: Path,
    workers: int = 2,
) -> list[Path]:
    """Every edge's sealed update for round ``a``, one file each, sealed in ``workers``
    processes (only file names and small arguments cross the process boundary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        SealJob(
            str(layout.root),
            edge,
            a.encode().decode(),
            tuple(sizes),
            samples=50 + i % 50,
            seed=a.round * 100_003 + i,
            out=str(out_dir / f"{edge}.r{a.round}.env"),
        )
        for i, edge in enumerate(edges)
    ]
    if workers <= 1:
        return [Path(_seal_one(j)) for j in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return [Path(p) for p in pool.map(_seal_one, jobs, chunksize=8)]


@dataclass
class SimFleet:
    """N simulated edges on ``len(conns)`` shared NATS connections."""

    edges: list[str]
    model: str
    conns: list[NATS]
    interval_s: float = 1.0
    beats_sent: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def connect(
        cls,
        url: str,
        user: str,
        password: str,
        edges: list[str],
        model: str,
        *,
        connections: int = 20,
        interval_s: float = 1.0,
    ) -> SimFleet:
        conns = [
            await nats.connect(url.split(","), user=user, password=password)
            for _ in range(max(1, min(connections, len(edges))))
        ]
        return cls(edges, model, conns, interval_s)

    def _conn(self, i: int) -> NATS:
        return self.conns[i % len(self.conns)]

    async def beat_once(self, seq: int) -> None:
        """One heartbeat of every edge, each on its own subject."""
        now = time.time()
        state = {self.model: ModelState(ready=[1])}
        for i, edge in enumerate(self.edges):
            beat = Heartbeat(
                edge_id=edge, url=f"http://127.0.0.1:{20000 + i}", seq=seq, ts=now, models=state
            )
            await self._conn(i).publish(subjects.heartbeat(edge), beat.encode())
        self.beats_sent += len(self.edges)

    async def _beat_forever(self) -> None:
        seq = 0
        while True:
            began = time.monotonic()
            await self.beat_once(seq)
            seq += 1
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - began)))

    def start_heartbeats(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._beat_forever())

    async def publish(self, files: Sequence[Path], concurrency: int = 8) -> float:
        """Publish the sealed ``files`` (each edge on its own connection's publisher),
        ``concurrency`` at a time; returns the seconds it took."""
        publishers = [UpdatePublisher.for_connection(nc, ack_timeout_s=30.0) for nc in self.conns]
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, path: Path) -> None:
            async with gate:
                data = await asyncio.to_thread(path.read_bytes)
                await publishers[i % len(publishers)].publish(data)

        began = time.monotonic()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(files)))
        return time.monotonic() - began

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for nc in self.conns:
            await nc.close()
