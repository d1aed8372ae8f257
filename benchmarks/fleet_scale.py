"""Trainer cost against fleet size: N simulated edges and the real trainer on a real
3-node NATS JetStream cluster (issue #17, item 4).

For each model size (``--params``, default 100k and 1M: the built-in ``wide`` model at
``hidden_for(n)``) and each fleet size (``--edges``, default 10, 100, 1000), on a fresh
3-node cluster (replicas 3):

1. N edge identities are enrolled in one registry; N simulated edges
   (:mod:`benchmarks.fleet_sim`) heartbeat on their own subjects every second;
2. the real trainer process (``python -m trainer serve``, FedAvg, ``MIN_UPDATES=N``) opens
   a round; every edge's update for it is sealed in a process pool (not timed), then all
   N are published with the edge runtime's publisher;
3. per round: the round close time (first publish to the record's ``closed_ts``), the
   trainer's CPU seconds over the same span (``/proc/<pid>/stat``, sampled every 0.1 s),
   its peak RSS while the round ran, and the bytes in and out of the three servers
   (``/varz``, heartbeats included).

Printed: one row per (size, N) with the medians over the rounds, and the growth of the
trainer's CPU time per update from the smallest N (goal: within 1.5x at N=1,000) and of
its peak RSS (goal: flat). Run:
``.venv/bin/python -m benchmarks.fleet_scale [--edges 10 100 1000] [--params 100000 1000000]``
(about 16 minutes on a busy 2-core machine with the defaults, 8 of them for 1M at
N=1,000, where every update waits on fsynced writes; ``--params 100000`` takes 3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

from benchmarks.fleet_sim import SimFleet, edge_names, enroll_fleet, seal_round
from fedcore.compression import sizes_from_layout
from fedcore.models.wide import hidden_for, parameter_count, wide_spec
from fedcore.params import layout
from fedcore.wire import ROUND_LOG_BUCKET, ROUNDS_BUCKET, RoundAnnouncement, RoundRecord, round_key
from fedgate.keys_cmd import KeyLayout
from tests.nats_cluster import start_nats_cluster
from tests.transport_harness import trainer_env

MODEL = "wide"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE / 1e6


@dataclass
class Sampler:
    """The trainer's CPU time and RSS every ``period_s``: (wall time, cpu s, rss MB)."""

    pid: int
    period_s: float = 0.1
    samples: list[tuple[float, float, float]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.samples.append((time.time(), proc_cpu_s(self.pid), proc_rss_mb(self.pid)))
            await asyncio.sleep(self.period_s)

    def cpu_at(self, t: float) -> float:
        before = [s for s in self.samples if s[0] <= t]
        return before[-1][1] if before else self.samples[0][1]

    def peak_rss(self, t0: float, t1: float) -> float:
        return max((s[2] for s in self.samples if t0 <= s[0] <= t1), default=0.0)


def varz_bytes(monitors: tuple[int, ...] | list[int]) -> int:
    total = 0
    for port in monitors:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as resp:
            v = json.loads(resp.read())
        total += int(v["in_bytes"]) + int(v["out_bytes"])
    return total


async def kv_value(js: nats.js.JetStreamContext, bucket: str, key: str) -> bytes | None:
    try:
        entry = await (await js.key_value(bucket)).get(key)
    except Exception:  # bucket or key not there yet
        return None
    return entry.value


async def wait_open(js: nats.js.JetStreamContext, n: int, within_s: float) -> RoundAnnouncement:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        raw = await kv_value(js, ROUNDS_BUCKET, MODEL)
        if raw:
            a = RoundAnnouncement.decode(raw)
            if a.round == n and a.state == "open":
                return a
        await asyncio.sleep(0.2)
    raise TimeoutError(f"round {n} never opened")


async def wait_record(js: nats.js.JetStreamContext, n: int, within_s: float) -> RoundRecord:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        raw = await kv_value(js, ROUND_LOG_BUCKET, round_key(MODEL, n))
        if raw:
            return RoundRecord.decode(raw)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"round {n} never closed")


@dataclass(frozen=True)
class RoundFigures:
    close_s: float
    cpu_s: float
    peak_rss_mb: float
    nats_mb: float
    seal_s: float
    publish_s: float
    outcome: str


def start_trainer(
    root: Path,
    keys: KeyLayout,
    nats_url: str,
    password_file: Path,
    hidden: int,
    n: int,
    rounds: int,
    replicas: int = 3,
) -> subprocess.Popen[bytes]:
    """The real trainer process on ``wide`` of width ``hidden``: rounds of ``n`` updates,
    ``rounds`` of them, then idle."""
    env = trainer_env(
        root,
        keys,
        nats_url,
        password_file,
        MODELS=f'["{MODEL}"]',
        MIN_UPDATES=str(n),
        ROUND_DEADLINE_S="3600",
        BOOTSTRAP_EPOCHS="1",
        NATS_REPLICAS=str(replicas),
        HEARTBEAT_TTL_S="30",
        MAX_ROUNDS=str(rounds),
    )
    env["FEDGATE_WIDE_HIDDEN"] = str(hidden)
    log = (root / "trainer.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve"], env=env, stdout=log, stderr=log
    )


async def one_round(
    js: nats.js.JetStreamContext,
    fleet: SimFleet,
    keys: KeyLayout,
    sampler: Sampler,
    monitors: tuple[int, ...] | list[int],
    sizes: list[int],
    root: Path,
    r: int,
) -> RoundFigures:
    a = await wait_open(js, r, 600)
    began = time.monotonic()
    files = await asyncio.to_thread(
        seal_round, keys, fleet.edges, a, sizes, root / "sealed", os.cpu_count() or 2
    )
    seal_s = time.monotonic() - began
    bytes0, t0 = varz_bytes(monitors), time.time()
    publish_s = await fleet.publish(files)
    record = await wait_record(js, r, 1200)
    t1 = time.time()
    for path in files:
        path.unlink()
    return RoundFigures(
        close_s=record.closed_ts - t0,
        cpu_s=sampler.cpu_at(record.closed_ts) - sampler.cpu_at(t0),
        peak_rss_mb=sampler.peak_rss(t0, t1),
        nats_mb=(varz_bytes(monitors) - bytes0) / 1e6,
        seal_s=seal_s,
        publish_s=publish_s,
        outcome=record.outcome,
    )


async def measure(root: Path, n: int, hidden: int, rounds: int) -> list[RoundFigures]:
    """``rounds`` rounds of ``n`` edges on a fresh cluster and trainer."""
    edges = edge_names(n)
    keys = enroll_fleet(root / "keys", edges)
    cluster = start_nats_cluster(root / "nats", ["trainer", "edges"])
    sizes = sizes_from_layout(layout(wide_spec(hidden).build_module()))
    trainer: subprocess.Popen[bytes] | None = None
    fleet = await SimFleet.connect(
        cluster.url, "edges", cluster.users["edges"], edges, MODEL, interval_s=1.0
    )
    nc = await nats.connect(cluster.urls, user="edges", password=cluster.users["edges"])
    try:
        fleet.start_heartbeats()
        trainer = start_trainer(
            root, keys, cluster.url, cluster.password_files["trainer"], hidden, n, rounds
        )
        sampler = Sampler(trainer.pid)
        sampling = asyncio.create_task(sampler.run())
        out = []
        for r in range(1, rounds + 1):
            out.append(
                await one_round(
                    nc.jetstream(), fleet, keys, sampler, cluster.monitors, sizes, root, r
                )
            )
        sampling.cancel()
        return out
    finally:
        await nc.close()
        await fleet.close()
        if trainer is not None:
            trainer.terminate()
            try:
                trainer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait()
        cluster.stop()


def rounds_for(n: int, params: int) -> int:
    if n >= 1000:
        return 1
    return 2 if n >= 100 or params >= 1_000_000 else 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (0: by N)")
    args = p.parse_args()
    print(
        f"{'params':>9} {'N':>5} {'rounds':>6} {'close s':>8} {'cpu s':>7} "
        f"{'cpu ms/upd':>10} {'peak RSS MB':>11} {'NATS MB':>8} {'publish s':>9} {'seal s':>7}"
    )
    for params in args.params:
        hidden = hidden_for(params)
        base: tuple[float, float] | None = None
        growth = []
        for n in args.edges:
            rounds = args.rounds or rounds_for(n, params)
            with tempfile.TemporaryDirectory(prefix="fedgate-fleet-") as tmp:
                figs = asyncio.run(measure(Path(tmp), n, hidden, rounds))
            med = {
                k: statistics.median(getattr(f, k) for f in figs)
                for k in ("close_s", "cpu_s", "peak_rss_mb", "nats_mb", "publish_s", "seal_s")
            }
            per_update = med["cpu_s"] / n * 1e3
            print(
                f"{parameter_count(hidden):>9} {n:>5} {rounds:>6} {med['close_s']:>8.2f} "
                f"{med['cpu_s']:>7.2f} {per_update:>10.2f} {med['peak_rss_mb']:>11.0f} "
                f"{med['nats_mb']:>8.0f} {med['publish_s']:>9.2f} {med['seal_s']:>7.1f}  "
                f"{','.join(f.outcome for f in figs)}",
                flush=True,
            )
            base = base or (per_update, med["peak_rss_mb"])
            growth.append((n, per_update / base[0], med["peak_rss_mb"] / base[1]))
        print(f"growth from N={args.edges[0]}, {parameter_count(hidden)} parameters:")
        for n, cpu, rss in growth:
            print(f"  N={n:>5}: trainer CPU per update x{cpu:.2f}, peak RSS x{rss:.2f}")


if __name__ == "__main__":
    main()
