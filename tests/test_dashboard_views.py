"""The dashboard's rendering of states a fresh stack does not reach quickly (a canary
rollout with its gates, an ejected edge, a refused key), in headless Chromium.

The page and its script are the real static files; the JSON API is a stub serving canned
answers in the gateway's shapes (unit level: the real API is covered by
``test_dashboard_browser`` and the routes' own tests).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.browser import OUTPUT, browse, chromium, section

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "static"
KEY = "fgk_test-key"
NOW = time.time()


def edge(edge_id: str, ready: list[int], **changes: Any) -> dict[str, Any]:
    out = {
        "edge_id": edge_id,
        "url": f"http://10.0.0.{edge_id[-1]}:8000",
        "device": "cuda",
        "models": {"digits": {"ready": ready, "failed": {}}},
        "outstanding": 2,
        "pending": 1,
        "served": 1234,
        "failures": 0,
        "ejected": False,
        "ejected_for_s": 0,
        "last_seen_s": 0.4,
    }
    return out | changes


def rollout(state: str, **changes: Any) -> dict[str, Any]:
    out = {
        "id": "r-0a1b2c3d4e5f",
        "model": "digits",
        "version": 3,
        "stable": 2,
        "spec": {
            "version": 3,
            "canary": 10.0,
            "stages": [5.0, 25.0, 50.0],
            "gates": {
                "max_error_rate": 0.01,
                "max_p99_ratio": 2.0,
                "p99_floor_ms": 10.0,
                "min_accuracy": 0.85,
                "min_labels": 20,
            },
            "window_s": 30.0,
            "min_requests": 50,
            "staging_timeout_s": 300.0,
            "auto_promote": True,
        },
        "state": state,
        "stage": 1,
        "created_ts": NOW - 120,
        "updated_ts": NOW - 10,
        "stage_started_ts": NOW - 10,
        "decided_ts": None,
        "ready_ts": NOW - 60,
        "reason": None,
        "actor": "local-admin",
        "settled": False,
        "gates_passed": False,
        "events": [
            {"ts": NOW - 120, "kind": "created", "message": "local-admin asked to roll out v3"},
            {"ts": NOW - 60, "kind": "canary", "message": "stage 1: 5% of traffic to v3"},
            {"ts": NOW - 10, "kind": "stage", "message": "stage 2: 25% of traffic to v3"},
        ],
        "weight": 0.25 if state == "canary" else 0.0,
    }
    return out | changes


LIVE = rollout(
    "canary",
    split={"stable": 2, "candidate": 3, "candidate_weight": 0.25},
    observation={
        "elapsed_s": 10.2,
        "candidate": {"requests": 61, "errors": 0, "p99_s": 0.0042, "labelled": 24, "correct": 22},
        "stable": {"requests": 180, "errors": 1, "p99_s": 0.0039, "labelled": 0, "correct": 0},
        "verdict": "observing (10.2 of 30 s)",
    },
)
API: dict[str, Any] = {
    "/v1/edges": {
        "edges": [
            edge("edge-1", [2, 3]),
            edge("edge-2", [2, 3], failures=2),
            edge("edge-3", [2], ejected=True, ejected_for_s=12.5, failures=3),
        ],
        "ts": NOW,
    },
    "/v1/models/digits/versions": {"model": "digits", "versions": []},
    "/v1/models/digits/rounds": {"model": "digits", "open": None, "rounds": []},
    "/v1/models/digits/routing": {
        "model": "digits",
        "split": {"stable": 2, "candidate": 3, "candidate_weight": 0.25},
        "served_versions": [2, 3],
        "default_version": 3,
    },
    "/v1/models/digits/latency": {
        "model": "digits",
        "versions": [
            {"version": "2", "requests": 180, "errors": 1, "mean_ms": 2.1}
            | {"p50_ms": 1.7, "p90_ms": 3.0, "p99_ms": 3.9},
            {"version": "3", "requests": 61, "errors": 0, "mean_ms": 2.3}
            | {"p50_ms": 1.9, "p90_ms": 3.4, "p99_ms": 4.2},
        ],
        "buckets_s": [],
    },
    "/v1/models/digits/rollouts": {
        "model": "digits",
        "rollouts": [
            rollout("canary"),
            rollout("promoted", id="r-000000000001", version=2, stable=1, stage=0),
        ],
    },
    "/v1/models/digits/rollouts/r-0a1b2c3d4e5f": LIVE,
}


class StubApi(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/" or path.startswith("/ui/"):
            name = "dashboard.html" if path == "/" else path.removeprefix("/ui/")
            kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
            self._send(200, (STATIC / name).read_bytes(), kind[name.rsplit(".", 1)[1]])
        elif self.headers.get("Authorization") != f"Bearer {KEY}":
            self._send(401, b'{"error": "unknown API key"}', "application/json")
        elif path in API:
            self._send(200, json.dumps(API[path]).encode(), "application/json")
        else:
            self._send(404, b'{"error": "Not Found"}', "application/json")


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    chromium()
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_canary_rollout_and_its_gates(stub_url: str, tmp_path: Path) -> None:
    result = browse(f"{stub_url}/#key={KEY}", tmp_path / "dom", "--dump-dom")
    dom = result.stdout
    rollout_html = section(dom, "rollout")
    assert "r-0a1b2c3d4e5f: v2 → v3" in rollout_html
    assert "2 of 3: 25% of traffic" in rollout_html
    assert "observing (10.2 of 30 s)" in rollout_html
    for gate in ("error rate (5xx)", "p99 latency", "label accuracy", "requests per stage"):
        assert f"<td>{gate}</td>" in rollout_html
    assert "92% (22 of 24)" in rollout_html and "4.2 ms" in rollout_html
    assert "0.6% (1 of 180)" in rollout_html
    assert "r-000000000001 v2" in rollout_html  # the earlier rollout
    fleet = section(dom, "fleet")
    assert "ejected 13 s" in fleet and "2 failure(s)" in fleet
    assert "3 edge(s), 2 admitted, 1 ejected" in fleet
    versions = section(dom, "versions")
    assert "candidate 25%" in versions and ">stable<" in versions
    assert "no closed round yet; no round open" in section(dom, "rounds")
    assert len(section(dom, "latency").split('<rect class="bar p')) - 1 == 6 + 3  # + legend
    OUTPUT.mkdir(parents=True, exist_ok=True)
    png = OUTPUT / "dashboard-rollout.png"
    png.unlink(missing_ok=True)
    browse(f"{stub_url}/#key={KEY}", tmp_path / "shot", f"--screenshot={png}")
    assert png.exists()


def test_a_refused_key_says_so(stub_url: str, tmp_path: Path) -> None:
    dom = browse(f"{stub_url}/#key=wrong", tmp_path / "dom", "--dump-dom").stdout
    assert "API key refused: unknown API key" in dom
    no_key = browse(f"{stub_url}/", tmp_path / "none", "--dump-dom").stdout
    assert "enter an API key to load the dashboard" in no_key
