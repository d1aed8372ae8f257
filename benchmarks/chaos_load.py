"""The chaos run's client side: a bounded inference load with labels, and the accounting
of updates (what the edges had acknowledged against what the trainer folded).

Used by ``benchmarks/chaos.py`` and ``tests/test_chaos.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import numpy as np

from fedcore.subjects import inbox_prefix
from fedcore.transport import LEDGER_BUCKET

MODEL = "digits"
RACE_S = 1.0
"""An update acknowledged less than this before its round closed (at its deadline) may
miss it: the trainer had not read it yet. Later than that it must have been folded."""


@dataclass
class Shot:
    """One inference request as the client saw it (monotonic times)."""

    start: float
    end: float
    status: int  # 0: no HTTP answer (connection refused or reset, timeout)
    edge: str


@dataclass
class Load:
    """``clients`` clients, each sending one-row requests with an id through the gateway
    and the true label as feedback right after; bounded by ``max_requests`` and by
    ``stop`` (the caller sets it). Every inference is recorded as a :class:`Shot`."""

    url: str
    key: str
    rows: np.ndarray
    labels: np.ndarray
    clients: int = 4
    pause_s: float = 0.02
    max_requests: int = 200_000
    shots: list[Shot] = field(default_factory=list)
    feedback_failed: int = 0
    _next: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=aiohttp.ClientTimeout(total=20),
        )
        self._tasks = [asyncio.create_task(self._client(c)) for c in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _client(self, client: int) -> None:
        while not self._stop.is_set() and self._next < self.max_requests:
            n, self._next = self._next, self._next + 1
            i = n % len(self.rows)
            rid = f"chaos-{client}-{n}"
            body = {
                "id": rid,
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "data": self.rows[i].astype(float).tolist(),
                    }
                ],
            }
            start = time.monotonic()
            try:
                async with self._session.post(
                    f"{self.url}/v2/models/{MODEL}/infer", json=body
                ) as r:
                    await r.read()
                    status, edge = r.status, r.headers.get("x-fedgate-edge", "")
            except (aiohttp.ClientError, TimeoutError):
                status, edge = 0, ""
            self.shots.append(Shot(start, time.monotonic(), status, edge))
            if status == 200:
                await self._feedback(rid, int(self.labels[i]))
            await asyncio.sleep(self.pause_s if status == 200 else max(self.pause_s, 0.05))

    async def _feedback(self, rid: str, label: int) -> None:
        body = {"model": MODEL, "id": rid, "label": label}
        try:
            async with self._session.post(f"{self.url}/v1/feedback", json=body) as r:
                await r.read()
                ok = r.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        self.feedback_failed += 0 if ok else 1

    def window(self, start: float, end: float) -> list[Shot]:
        """Requests in flight at ``start`` or started before ``end``."""
        return [s for s in self.shots if s.end >= start and s.start <= end]

    def served_since(self, since: float) -> set[str]:
        return {s.edge for s in self.shots if s.start > since and s.status == 200}


def http_json(url: str, key: str, timeout: float = 5.0) -> Any:
    """GET ``url`` with ``key``; None when it cannot be read (the gateway may be down)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError, urllib.error.HTTPError):
        return None


# -- accounting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Acked:
    """An update the edge published and JetStream acknowledged (its ``update-published``)."""

    edge: str
    round: int
    update_id: str
    ts: float


@dataclass
class Ledger:
    """What the accounting found."""

    acked: int = 0
    counted: int = 0
    late: int = 0  # acknowledged after its round closed: refused as stale, not lost
    pending: int = 0  # its round is still open
    lost: list[str] = field(default_factory=list)
    double: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.double


def acked_updates(logs_dir: Path) -> list[Acked]:
    """Every ``update-published`` event in the edges' logs (restarts append to them)."""
    found: list[Acked] = []
    for path in sorted(logs_dir.glob("edge-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"update-published"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "update-published" and rec.get("model") == MODEL:
                ts = float(rec["ts"])  # the event's own time.time() (it overrides the line's)
                found.append(Acked(path.stem, int(rec["round"]), rec["update_id"], ts))
    return found


async def ledger_records(nats_url: str, password: str) -> dict[tuple[int, str], str]:
    """The trainer's ledger: (round, edge) -> update id, read with the trainer's user."""
    nc = await nats.connect(
        nats_url,
        user="trainer",
        password=password,
        inbox_prefix=inbox_prefix("trainer"),  # the only inbox the trainer's user may read
        max_reconnect_attempts=2,
    )
    try:
        kv = await nc.jetstream().key_value(LEDGER_BUCKET)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return {}
        out: dict[tuple[int, str], str] = {}
        for key in keys:
            model, rnd, edge = key.split(".", 2)
            entry = await kv.get(key)
            if model == MODEL and entry.value:
                out[(int(rnd), edge)] = json.loads(entry.value)["update_id"]
        return out
    finally:
        await nc.close()


def account(
    acked: list[Acked], rounds: list[dict[str, Any]], ledger: dict[tuple[int, str], str]
) -> Ledger:
    """Every acknowledged update counted once in its round, or late for a closed one."""
    result = Ledger(acked=len(acked))
    closed = {int(r["round"]): r for r in rounds}
    seen = Counter(a.update_id for a in acked)
    result.double += [f"update {u} published {n} times" for u, n in seen.items() if n > 1]
    for uid, n in Counter(ledger.values()).items():
        if n > 1:
            result.double.append(f"update {uid} holds {n} ledger records")
    for r in rounds:
        edges = Counter(c["edge_id"] for c in r["contributors"])
        result.double += [
            f"round {r['round']}: {e} counted {n} times" for e, n in edges.items() if n > 1
        ]
        result.double += [
            f"round {r['round']}: {e} folded without a ledger record"
            for e in edges
            if (int(r["round"]), e) not in ledger and r["outcome"] != "failed"
        ]
    for a in acked:
        record = closed.get(a.round)
        if record is None:
            result.pending += 1
            continue
        contributors = {c["edge_id"] for c in record["contributors"]}
        claimed = ledger.get((a.round, a.edge))
        if a.edge in contributors and claimed == a.update_id:
            result.counted += 1
        elif a.edge in contributors:
            result.double.append(f"round {a.round}: {a.edge} counted {claimed}, not {a.update_id}")
        elif claimed == a.update_id or a.ts < float(record["closed_ts"]) - RACE_S:
            result.lost.append(
                f"round {a.round} ({record['outcome']}): {a.edge}'s update {a.update_id} "
                f"acknowledged {float(record['closed_ts']) - a.ts:.2f}s before the round "
                f"closed, not folded (ledger: {claimed})"
            )
        else:
            result.late += 1
    return result
