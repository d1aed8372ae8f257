"""The dashboard route and the latency summary it charts (in process, no bus)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.app import GatewayApp, create_app
from gateway.auth import generate_key, key_line
from gateway.metrics import LATENCY_BUCKETS, RequestStats
from gateway.routes.dashboard import latency_summary, quantile
from gateway.settings import GatewaySettings

STATIC = Path(__file__).parent.parent / "gateway" / "static"


def make_app(tmp_path: Path, key: str) -> GatewayApp:
    settings = GatewaySettings.model_validate(
        {
            "nats_user": "gateway",
            "nats_password_file": tmp_path / "nats.pass",
            "log_json": False,
            "api_keys": key_line("infer", "viewer", key),
        }
    )
    return create_app(settings, bus=False)


def client(app: GatewayApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_the_page_needs_no_key_and_fetches_nothing_from_elsewhere(tmp_path: Path) -> None:
    app = make_app(tmp_path, generate_key())
    async with client(app) as c:
        page = await c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert '<script src="/ui/dashboard.js"' in page.text
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            asset = await c.get(f"/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert asset.content == (STATIC / name).read_bytes()
        missing = await c.get("/ui/../settings.py")
        assert missing.status_code == 404
        assert (await c.get("/ui/secrets.txt")).json() == {
            "error": "no dashboard asset 'secrets.txt'"
        }


def test_static_files_reference_no_other_origin() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
        assert ".innerHTML" not in text, f"{path.name}: render with textContent"


async def test_latency_endpoint_needs_a_key_and_summarises_per_version(tmp_path: Path) -> None:
    key = generate_key()
    app = make_app(tmp_path, key)
    for seconds in (0.0003, 0.0004, 0.003, 0.004):
        app.state.metrics.observe("digits", "1", "edge-1", 200, seconds)
    app.state.metrics.observe("digits", "2", "edge-2", 500, 0.02)
    app.state.metrics.observe("digits", "", "", 503, 0.0001)  # never routed: left out
    app.state.metrics.observe("other", "1", "edge-1", 200, 0.1)
    async with client(app) as c:
        assert (await c.get("/v1/models/digits/latency")).status_code == 401
        resp = await c.get("/v1/models/digits/latency", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == "digits" and body["buckets_s"] == list(LATENCY_BUCKETS)
    v1, v2 = body["versions"]
    assert v1["version"] == "1" and v1["requests"] == 4 and v1["errors"] == 0
    assert v1["mean_ms"] == pytest.approx(1.925)
    # ranks 2 and 3.6 of 4: the 2nd sample ends bucket (0.00025, 0.0005]; 3.6 lies 80% into
    # (0.002, 0.005] which holds the last two
    assert v1["p50_ms"] == pytest.approx(0.5)
    assert v1["p90_ms"] == pytest.approx(2.0 + 3.0 * 0.8)
    assert v2 == {
        "version": "2",
        "requests": 1,
        "errors": 1,
        "mean_ms": 20.0,
        "p50_ms": pytest.approx(17.5),
        "p90_ms": pytest.approx(23.5),
        "p99_ms": pytest.approx(24.85),
    }


def test_quantile_edges() -> None:
    empty = [0] * (len(LATENCY_BUCKETS) + 1)
    assert quantile(0.5, empty) is None
    first = [*empty]
    first[0] = 2
    assert quantile(0.5, first) == pytest.approx(LATENCY_BUCKETS[0] / 2)
    overflow = [*empty]
    overflow[-1] = 1
    assert quantile(0.99, overflow) == LATENCY_BUCKETS[-1]


def test_versions_sort_numerically() -> None:
    stats = RequestStats()
    for version in ("10", "2", "1"):
        stats.observe("digits", version, "edge-1", 200, 0.001)
    assert [r["version"] for r in latency_summary(stats, "digits")] == ["1", "2", "10"]
