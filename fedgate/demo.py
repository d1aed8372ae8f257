"""``fedgate demo``: the whole loop on one machine, seen.

Starts the stack, splits the model's demo traffic (its spec's ``demo_data`` generator, or
a built-in's data set: ``digits`` by default, ``--model diabetes`` for regression; any
number of inputs) across the edges with a Dirichlet label skew (by
class, or by target quantile for a regression; one "site" per edge, whose clients send to
their own edge with
``x-fedgate-prefer-edge``), and per round: replays the site's traffic through the
gateway with request ids, sends the labels back a moment later (``POST /v1/feedback``),
goes quiet so the edges see an idle window and fine-tune, waits for the trainer to close
the round and release a version, and drives canary traffic until the gateway promotes or
rolls the version back. Finally it scores the held-out split through the gateway with the
model's own metric (accuracy, MAE, ...) and exits 0 only if the federated model beats
version 1 in that metric's direction. ``--async`` runs buffered asynchronous rounds
instead: a buffer closes when every edge's update is in, or at its timeout with all but
one; an edge that trains from an older version still sends, and its update joins the
buffer open then, weighted down (marked ``~`` in the table).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.spec import ModelSpec
from fedcore.task import Label, LabelKind, metric_value
from fedgate.demo_table import RoundRow, _contributor, table
from fedgate.launcher import Stack, StackConfig, supervised
from fedgate.progress import Wait, Waits

Out = Callable[[str], None]
MODEL = "digits"
STRATA = 5
"""A regression's sites are skewed over this many quantile bins of its target."""


@dataclass(frozen=True)
class DemoPlan:
    """How the demo drives the stack."""

    rounds: int = 5
    per_edge: int = 120  # labelled requests per edge per round
    alpha: float = 0.5  # Dirichlet label skew across sites
    feedback_delay_s: float = 1.0
    round_timeout_s: float = 150.0
    rollout_timeout_s: float = 120.0
    concurrency: int = 8
    seed: int = 0


@dataclass
class Site:
    edge: str
    pool: NDArray[Any]  # indices into the training split
    labels: dict[int, int] = field(default_factory=dict)


ASYNC_BUFFER_TIMEOUT_S = 30.0
"""``--async``: a buffer short of every edge closes this long after it opened."""


def demo_overrides(
    edges: int, rounds: int, asynchronous: bool = False
) -> dict[str, dict[str, str]]:
    """Settings that make a round take seconds, not minutes, on 2 cores."""
    rollout = {"canary": 30.0, "window_s": 2.0, "min_requests": 20, "staging_timeout_s": 90.0}
    buffered = {
        "ROUND_MODE": "async",
        "BUFFER_SIZE": str(edges),
        "MIN_UPDATES": str(max(1, edges - 1)),
        "ROUND_DEADLINE_S": str(ASYNC_BUFFER_TIMEOUT_S),
        "MAX_STALENESS": "2",
    }
    return {
        "FEDGATE_TRAINER_": (buffered if asynchronous else {})
        | {
            "MIN_UPDATES": buffered["MIN_UPDATES"] if asynchronous else str(edges),
            "ROUND_DEADLINE_S": buffered["ROUND_DEADLINE_S"] if asynchronous else "90",
            "MAX_ROUNDS": str(rounds),
            "ROUND_INTERVAL_S": "0",
            # hold every candidate below serving on the held-out set, so the served
            # version never goes down: the demo passes only when the final version beats
            # version 1, and a gate that released up to one paired standard error below
            # serving (GATE_Z 1) let a few rounds walk below it (README, "Runs vary")
            "GATE_MARGIN": "0.0",
            "GATE_Z": "0.0",
            "ROLLOUT_OPTIONS": json.dumps(rollout),
        },
        "FEDGATE_EDGE_": {
            "CAPTURE_RATE": "1.0",
            "MIN_NEW_LABELS": "48",
            "IDLE_QUIET_S": "1.0",
        },
    }


def strata(spec: ModelSpec, y: NDArray[Any]) -> NDArray[Any]:
    """Each sample's stratum: its class, or its quantile bin of a regression's target."""
    if spec.task.label is LabelKind.CLASS:
        return y
    first = np.asarray(y, dtype=np.float64).reshape(len(y), -1)[:, 0]
    edges = np.quantile(first, np.linspace(0, 1, STRATA + 1)[1:-1])
    return np.searchsorted(edges, first)


def split_sites(y: NDArray[Any], edges: list[str], alpha: float, seed: int) -> list[Site]:
    """Each stratum's samples divided among the sites by Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    shares: list[list[int]] = [[] for _ in edges]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * len(edges)))[:-1] * len(idx)).astype(int)
        for site, part in enumerate(np.split(idx, cuts)):
            shares[site].extend(part.tolist())
    return [
        Site(e, np.array(sorted(s), dtype=np.int64)) for e, s in zip(edges, shares, strict=True)
    ]


def take(x: Any, k: int) -> Any:
    """Row ``k`` of a batch: an array (one-input models) or inputs by name."""
    if isinstance(x, dict):
        return {name: v[k] for name, v in x.items()}
    return x[k]


def label_of(spec: ModelSpec, y: NDArray[Any]) -> Label:
    """One training target as feedback carries it."""
    if spec.task.label is LabelKind.CLASS:
        return int(y)
    values = np.asarray(y, dtype=np.float64).reshape(-1).tolist()
    return float(values[0]) if spec.task.label is LabelKind.FLOAT else values


class GatewayClient:
    """The demo's HTTP client of the gateway (one pooled session, infer key) for one model."""

    def __init__(self, url: str, infer_key: str, admin_key: str, spec: ModelSpec) -> None:
        self.spec = spec
        self.model = spec.name
        self.url = url.rstrip("/")
        self.infer = {"Authorization": f"Bearer {infer_key}"}
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self.session.close()

    async def predict(self, row: Any, rid: str, prefer: str | None) -> tuple[NDArray[Any], str]:
        """The task's output for one row (an array, or inputs by name), and the version
        that served it."""
        feeds = self.spec.feeds(row)
        body = {
            "id": rid,
            "inputs": [
                {
                    "name": t.name,
                    "shape": [1, *t.shape],
                    "datatype": t.datatype,
                    "data": feeds[t.name].reshape(-1).tolist(),
                }
                for t in self.spec.inputs
            ],
        }
        headers = dict(self.infer)
        if prefer:
            headers["x-fedgate-prefer-edge"] = prefer
        async with self.session.post(
            f"{self.url}/v2/models/{self.model}/infer", json=body, headers=headers
        ) as r:
            doc = await r.json()
            if r.status != 200:
                raise RuntimeError(f"inference failed ({r.status}): {doc}")
            target = self.spec.target.name
            out = next(o for o in doc["outputs"] if o["name"] == target)
            return np.asarray(out["data"], dtype=np.float64), r.headers.get(
                "x-fedgate-model-version", "?"
            )

    async def feedback(self, rid: str, label: Label) -> int:
        body = {"model": self.model, "id": rid, "label": label}
        async with self.session.post(f"{self.url}/v1/feedback", json=body, headers=self.infer) as r:
            await r.read()
            return r.status

    async def get(self, path: str, admin: bool = False) -> dict[str, Any]:
        async with self.session.get(
            self.url + path, headers=self.admin if admin else self.infer
        ) as r:
            doc: dict[str, Any] = await r.json()
            return doc if r.status == 200 else {}


async def _bounded(limit: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(run(j) for j in jobs))


async def replay(
    client: GatewayClient,
    sites: list[Site],
    x: Any,
    y: NDArray[Any],
    plan: DemoPlan,
    tag: str,
    rng: np.random.Generator,
    per_edge: int,
) -> tuple[int, int]:
    """Send ``per_edge`` requests per site, then their labels; returns (sent, joined)."""
    batch: list[tuple[str, int, str]] = []
    for site in sites:
        picks = rng.choice(site.pool, size=min(per_edge, len(site.pool) * 3), replace=True)
        batch.extend(
            (f"demo-{tag}-{site.edge}-{i}", int(k), site.edge) for i, k in enumerate(picks)
        )
    await _bounded(
        plan.concurrency,
        [partial(client.predict, take(x, k), rid, e) for rid, k, e in batch],
    )
    await asyncio.sleep(plan.feedback_delay_s)  # labels arrive later than the requests
    codes = await _bounded(
        plan.concurrency,
        [partial(client.feedback, rid, label_of(client.spec, y[k])) for rid, k, _ in batch],
    )
    return len(batch), sum(1 for c in codes if c == 200)


async def metric_through_gateway(
    client: GatewayClient, x: Any, y: NDArray[Any], concurrency: int
) -> tuple[float, set[str]]:
    """The model's metric on (x, y) as served through the gateway, and the versions seen."""
    results = await _bounded(
        concurrency,
        [
            partial(client.predict, take(x, i), f"eval-{time.time_ns()}-{i}", None)
            for i in range(len(y))
        ],
    )
    outputs = np.stack([o for o, _ in results])
    value = metric_value(client.spec.task, outputs, y)
    return (0.0 if value is None else value), {v for _, v in results}


Probe = Callable[[Wait], Awaitable[Any]]


async def wait_for(
    probe: Probe,
    timeout_s: float,
    waits: Waits,
    what: str,
    tick: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``probe`` until it returns something (it reports the state it sees to the
    wait it is given); shown by ``waits``."""
    deadline = time.monotonic() + timeout_s
    with waits.wait(what, timeout_s) as wait:
        while time.monotonic() < deadline:
            found = await probe(wait)
            if found is not None:
                return found
            if tick is not None:
                await tick()
            await asyncio.sleep(0.5)
    raise TimeoutError(f"timed out: {what}")


async def _open_round(client: GatewayClient, n: int, wait: Wait) -> dict[str, Any] | None:
    doc = await client.get(f"/v1/models/{client.model}/rounds?limit=1")
    opened = doc.get("open") or {}
    return opened if opened.get("round") == n and opened.get("state") == "open" else None


async def _closed_round(client: GatewayClient, n: int, wait: Wait) -> dict[str, Any] | None:
    doc = await client.get(f"/v1/models/{client.model}/rounds?limit=5")
    for record in doc.get("rounds", []):
        if record.get("round") == n:
            found: dict[str, Any] = record
            return found
    opened = doc.get("open") or {}
    if opened.get("round") == n:  # open: edges train; closed: the trainer aggregates
        wait.state("edges training" if opened.get("state") == "open" else "trainer aggregating")
    return None


async def _settled_rollout(
    client: GatewayClient, version: int, wait: Wait
) -> dict[str, Any] | None:
    doc = await client.get(f"/v1/models/{client.model}/rollouts", admin=True)
    for r in doc.get("rollouts", []):
        if r.get("version") != version:
            continue
        if r.get("state") in ("promoted", "rolled_back", "failed"):
            found: dict[str, Any] = r
            return found
        weight = f" at {r.get('weight', 0) * 100:g}%" if r.get("state") == "canary" else ""
        wait.state(f"{r.get('state')}{weight}")
    return None


async def run_round(
    n: int,
    client: GatewayClient,
    sites: list[Site],
    data: tuple[Any, NDArray[Any]],
    plan: DemoPlan,
    out: Out,
    waits: Waits,
) -> RoundRow:
    """One round as the user watches it: ``out`` its lines, ``waits`` its waits."""
    x, y = data[0], data[1]
    rng = np.random.default_rng(plan.seed + n)
    row = RoundRow(n)
    opened = await wait_for(
        partial(_open_round, client, n), plan.round_timeout_s, waits, f"round {n} to open"
    )
    out(f"round {n}: open on version {opened['base_version']}; replaying site traffic")
    sent, joined = await replay(client, sites, x, y, plan, f"r{n}", rng, plan.per_edge)
    out(
        f"round {n}: {sent} requests served, {joined} labels joined at the edges; "
        "edges go idle and learn"
    )
    record = await wait_for(
        partial(_closed_round, client, n),
        plan.round_timeout_s,
        waits,
        f"round {n}: the edges' updates and the trainer's verdict",
    )
    contributors = record.get("contributors", [])
    row.edges = ",".join(_contributor(c, record) for c in contributors) or "-"
    row.samples = None if record.get("secure") else sum(int(c["samples"]) for c in contributors)
    row.value, row.loss, row.epsilon = (
        record.get("value", record.get("accuracy")),
        record.get("loss"),
        record.get("epsilon"),
    )
    row.serving, row.se = record.get("serving_value"), record.get("paired_se")
    version = record.get("released_version")
    secure = (
        f"; secure aggregation: {record.get('survivors')} edges in the sum, "
        f"{record.get('dropped')} dropped"
        if record.get("secure")
        else ""
    )
    out(f"round {n}: {record['outcome']} ({record['reason']}{secure})")
    if record["outcome"] != "released" or version is None:
        row.released = record["outcome"]
        return row
    row.released = f"v{version}"

    async def canary_traffic() -> None:
        await replay(client, sites, x, y, plan, f"c{n}-{time.time_ns()}", rng, 8)

    rollout = await wait_for(
        partial(_settled_rollout, client, int(version)),
        plan.rollout_timeout_s,
        waits,
        f"rollout of v{version} (canary traffic flowing)",
        canary_traffic,
    )
    row.rollout = str(rollout["state"])
    out(
        f"round {n}: rollout of v{version} {rollout['state']}"
        + (f" ({rollout.get('reason')})" if rollout.get("reason") else "")
    )
    return row


async def drive(
    stack: Stack, plan: DemoPlan, out: Out, model: str = MODEL, waits: Waits | None = None
) -> int:
    """The demo's rounds of ``model`` on a started stack, then its table and verdict: the
    exit code (0 only if the model ends better than its version 1). ``waits``: how the
    waits are shown (default: a line when one starts or changes state, to ``out``); when
    live, the table is drawn for a terminal too."""
    waits = waits or Waits(out)
    spec = get_spec(model)
    source = spec.demo_data or spec.dataset
    if source is None:
        raise ModelSpecError(
            f"model {model!r} has no demo traffic: give its spec a demo_data generator"
        )
    x_train, y_train, x_test, y_test = source()
    sites = split_sites(strata(spec, y_train), stack.edge_ids, plan.alpha, plan.seed)
    for s in sites:
        out(f"  site {s.edge}: {len(s.pool)} samples, {describe(spec, y_train[s.pool])}")
    client = GatewayClient(stack.gateway_url, stack.api_key("infer"), stack.api_key("admin"), spec)
    m = spec.task.metric_spec
    try:
        base, versions = await metric_through_gateway(client, x_test, y_test, plan.concurrency)
        out(
            f"version 1 on {len(y_test)} held-out samples of {model}, through the gateway: "
            f"{m.name} {base:.3f} ({m.direction} is better)"
        )
        rows = []
        for n in range(1, plan.rounds + 1):
            data = (x_train, y_train)
            rows.append(await run_round(n, client, sites, data, plan, out, waits))
        final, versions = await metric_through_gateway(client, x_test, y_test, plan.concurrency)
    finally:
        await client.close()
    out("")
    for line in table(rows, m, fancy=waits.live):
        out(line)
    out("")
    served = ",".join(sorted(versions))
    out(
        f"held-out {m.name} through the gateway: version 1 {base:.3f} -> now {final:.3f} "
        f"(served version {served}; {m.direction} is better)"
    )
    if m.worse_by(base, final) < 0:
        out(f"demo passed: the federated model is better than version 1 on {m.name}")
        return 0
    out(f"demo FAILED: the federated model is not better than version 1 on {m.name}")
    return 1


def describe(spec: ModelSpec, y: NDArray[Any]) -> str:
    """A site's labels in a line: class counts, or a regression target's spread."""
    if spec.task.label is LabelKind.CLASS:
        width = spec.target.width
        return f"label counts {np.bincount(y, minlength=width).tolist()}"
    first = np.asarray(y, dtype=np.float64).reshape(len(y), -1)[:, 0]
    return f"target mean {first.mean():.1f}, quartiles {np.percentile(first, [25, 75]).round(1)}"


def run_demo(
    config: StackConfig,
    out: Out,
    rounds: int = 5,
    asynchronous: bool = False,
    live: bool = False,
) -> int:
    """Start the stack, run the rounds of each of its models side by side (each with its
    own rounds, versions and rollouts), print the tables, stop. Returns the exit code:
    0 only if every model ends better than its version 1. ``asynchronous``: buffered
    async rounds (``fedgate demo --async``). ``live``: for a terminal, a live progress
    display of the waits and tables in colour (:mod:`fedgate.progress`)."""
    overrides = demo_overrides(config.edges, rounds, asynchronous)
    for prefix, values in config.overrides.items():
        overrides.setdefault(prefix, {}).update(values)
    stack = Stack(StackConfig(**{**config.__dict__, "overrides": overrides}))
    try:
        with Waits(out, live=live) as waits:
            mode = "buffered async" if asynchronous else "sync"
            where = config.data_dir
            out(f"starting fedgate with {config.edges} edge(s), {mode} rounds, under {where}")
            t0 = time.monotonic()
            with waits.wait("the stack to start", steps=stack.start_steps - 1) as wait:
                stack.start(wait.stepper())
            out(
                f"stack ready in {time.monotonic() - t0:.1f}s; gateway at {stack.gateway_url} "
                f"(dashboard at {stack.gateway_url}/#key=<admin key from {stack.admin_key_file}>)"
            )
            work = drive_all(stack, DemoPlan(rounds=rounds), out, waits)
            code = asyncio.run(supervised(stack, work))
            out(f"demo took {time.monotonic() - t0:.0f}s")
            return code
    finally:
        stack.stop()
        out("stack stopped")


async def drive_all(stack: Stack, plan: DemoPlan, out: Out, waits: Waits | None = None) -> int:
    """:func:`drive` every model of the stack at once; lines (and waits) are prefixed by
    the model when there are several."""
    models = stack.config.models
    waits = waits or Waits(out)
    if len(models) == 1:
        return await drive(stack, plan, out, models[0], waits)

    def prefixed(model: str) -> Out:
        return lambda line: out(f"[{model}] {line}")

    codes = await asyncio.gather(
        *(
            drive(stack, plan, prefixed(m), m, waits.prefixed(f"[{m}] ", prefixed(m)))
            for m in models
        )
    )
    return max(codes)
