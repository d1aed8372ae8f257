"""The dashboard in headless Chromium against a running stack (``fedgate.launcher.Stack``).

Real nats-server, trainer, two edges with their tritonservers, and the gateway. The test
writes a round history and lineage into the trainer's KV buckets (as the trainer writes
them), sends inference traffic so the gateway has latency to show, then loads ``/`` in
Chromium twice: once dumping the DOM the page's script rendered, once taking a
screenshot, saved as ``test-output/dashboard/dashboard.png``. The same stack serves the
metrics tests: every service exposes Prometheus metrics.

Chromium is Debian's ``chromium`` (``scripts/ensure-chromium.sh`` installs it). Without it
the test skips, except under CI (``$CI`` set), where it fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from fedcore.kv import kv_bucket
from fedcore.process import free_port
from fedcore.subjects import inbox_prefix
from fedcore.wire import (
    LINEAGE_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
    Contributor,
    Lineage,
    RoundAnnouncement,
    RoundRecord,
    round_key,
    version_key,
)
from fedgate.launcher import Stack, StackConfig
from tests.browser import OUTPUT, browse, chromium, section

# (round, outcome, accuracy, loss, serving accuracy); released rounds make versions 2, 3, 4
HISTORY = [
    (1, "released", 0.861, 0.52, 0.834),
    (2, "held", 0.852, 0.55, 0.861),
    (3, "released", 0.889, 0.41, 0.861),
    (4, "failed", None, None, None),
    (5, "released", 0.912, 0.33, 0.889),
    (6, "held", 0.905, 0.35, 0.912),
]
SECURE = 6  # this round was securely aggregated


def history(model: str, edges: list[str]) -> tuple[list[RoundRecord], list[Lineage]]:
    """Round records and lineage of a plausible run: 6 rounds, versions 2 to 4 released."""
    records, lineage = [], []
    version, t0 = 1, time.time() - 600
    for rnd, outcome, acc, loss, serving in HISTORY:
        contributors = [
            Contributor(
                edge_id=e,
                samples=40 + 8 * rnd + 5 * i,
                base_version=version,
                weight=1.0,
                metrics={"accuracy": 0.8 + 0.01 * rnd},
            )
            for i, e in enumerate(edges)
            if outcome != "failed"
        ]
        released = version + 1 if outcome == "released" else None
        opened, closed = t0 + 90 * rnd, t0 + 90 * rnd + 20 + rnd
        records.append(
            RoundRecord(
                model=model,
                round=rnd,
                mode="sync",
                outcome=outcome,
                reason={
                    "released": "candidate beats serving",
                    "held": "candidate below serving accuracy",
                    "failed": "deadline passed without quorum",
                }[outcome],
                base_version=version,
                released_version=released,
                opened_ts=opened,
                closed_ts=closed,
                contributors=contributors,
                accuracy=acc,
                loss=loss,
                serving_accuracy=serving,
                **({"secure": True, "survivors": 2, "dropped": 0} if rnd == SECURE else {}),
            )
        )
        if released is not None:
            lineage.append(
                Lineage(
                    model=model,
                    version=released,
                    parent_version=version,
                    round=rnd,
                    digest=f"{released:02d}" * 32,
                    strategy="fedavgm",
                    contributors=contributors,
                    samples=sum(c.samples for c in contributors),
                    accuracy=acc,
                    loss=loss,
                    created_ts=closed,
                )
            )
            version = released
    return records, lineage


async def seed_history(stack: Stack, model: str = "digits") -> None:
    """Write the history into the trainer's buckets, as the trainer (its NATS user)."""
    password = (stack.config.data_dir / "secrets" / "nats-trainer.pass").read_text().strip()
    nc = await nats.connect(
        stack.nats_url, user="trainer", password=password, inbox_prefix=inbox_prefix("trainer")
    )
    try:
        js = nc.jetstream()
        records, lineage = history(model, stack.edge_ids)
        log = await kv_bucket(js, ROUND_LOG_BUCKET)
        for r in records:
            await log.put(round_key(model, r.round), r.encode())
        versions = await kv_bucket(js, LINEAGE_BUCKET)
        for v in lineage:
            await versions.put(version_key(model, v.version), v.encode())
        now = time.time()
        announcement = RoundAnnouncement(
            model=model,
            round=len(records) + 1,
            mode="sync",
            base_version=lineage[-1].version,
            base_digest="ab" * 32,
            opened_ts=now,
            deadline_ts=now + 60,
        )
        await (await kv_bucket(js, ROUNDS_BUCKET)).put(model, announcement.encode())
    finally:
        await nc.drain()


def infer(stack: Stack, n: int) -> None:
    body = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()
    headers = {"Authorization": f"Bearer {stack.api_key()}", "Content-Type": "application/json"}
    for _ in range(n):
        req = urllib.request.Request(
            stack.gateway_url + "/v2/models/digits/infer", data=body, headers=headers
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    chromium()  # skip before starting anything when there is no browser
    running = Stack(
        StackConfig(data_dir=tmp_path_factory.mktemp("dash-stack"), edges=2, port=free_port())
    )
    try:
        running.start()
        asyncio.run(seed_history(running))
        infer(running, 40)
        yield running
    finally:
        running.stop()


def test_dashboard_renders_the_stack(stack: Stack, tmp_path: Path) -> None:
    url = f"{stack.gateway_url}/#key={stack.api_key('admin')}&model=digits"
    result = browse(url, tmp_path / "profile-dom", "--dump-dom")
    dom = result.stdout
    assert "<section" in dom, result.stderr[-2000:]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "dashboard.html").write_text(dom)
    assert stack.api_key("admin") not in dom  # the key left the address bar

    fleet = section(dom, "fleet")
    for edge in stack.edge_ids:
        assert f'<span class="edge-id">{edge}</span>' in fleet
    assert "healthy" in fleet and ">v1<" in fleet
    assert "2 edge(s), 2 admitted, 0 ejected" in fleet

    versions = section(dom, "versions")
    for v in (1, 2, 3, 4):
        assert f"<strong>v{v}</strong>" in versions
    assert "fedavgm" in versions and "bootstrap" in versions

    rounds = section(dom, "rounds")
    rows = re.findall(r"<tr><td>(\d+)</td><td>sync(?:, secure)?</td>", rounds)
    assert sorted(map(int, rows)) == [1, 2, 3, 4, 5, 6]
    assert f"<tr><td>{SECURE}</td><td>sync, secure</td>" in rounds
    assert "2 in the sum, 0 dropped" in rounds
    assert "deadline passed without quorum" in rounds and "v3 → v4" in rounds
    chart = re.search(r'<svg [^>]*id="rounds-chart".*?</svg>', rounds, re.S)
    assert chart, "no rounds chart"
    # round 1 may be overwritten by the real trainer's first (failed) round: at least 4
    assert len(re.findall(r'<circle class="pt acc', chart.group(0))) >= 4
    assert len(re.findall(r'<circle class="pt loss', chart.group(0))) >= 4
    assert "<polyline" in chart.group(0)

    latency = section(dom, "latency")
    assert re.search(r'<svg [^>]*id="latency-chart"', latency)
    assert len(re.findall(r'<rect class="bar p\d\d"', latency)) >= 3
    assert ">v1<" in latency and ">40<" in latency

    rollout = section(dom, "rollout")
    assert "no rollout of this model yet" in rollout, rollout
    assert "Traffic: no split: unversioned requests go to v1" in rollout

    assert 'id="status" role="status" class="">updated' in dom


def test_dashboard_screenshot(stack: Stack, tmp_path: Path) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    png = OUTPUT / "dashboard.png"
    png.unlink(missing_ok=True)
    url = f"{stack.gateway_url}/#key={stack.api_key('admin')}&model=digits"
    result = browse(url, tmp_path / "profile-shot", f"--screenshot={png}")
    assert png.exists(), result.stderr[-2000:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def test_gateway_and_trainer_serve_prometheus_metrics(stack: Stack) -> None:
    urls = stack.metrics_urls()
    gateway = scrape(urls["gateway"], {"Authorization": f"Bearer {stack.api_key()}"})
    assert "fedgate_gateway_request_duration_seconds_bucket" in gateway
    trainer = scrape(urls["trainer"])
    assert 'fedgate_trainer_model_version{model="digits"} 1.0' in trainer
    assert 'fedgate_trainer_updates_rejected_total{reason="bad-signature"} 0.0' in trainer
    assert "nv_inference_request_success" in scrape(urls["edge-1 triton"])


def test_edge_runtimes_serve_prometheus_metrics(stack: Stack) -> None:
    for edge in stack.edge_ids:
        text = scrape(stack.metrics_urls()[edge])
        assert 'fedgate_edge_spool_samples{model="digits"}' in text
