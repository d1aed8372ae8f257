"""``fedgate status`` against a stub gateway API (unit level; test_stack runs it for real)."""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fedcore.errors import FedgateError
from fedcore.keys import write_secret
from fedgate import status
from fedgate.display import render_table
from fedgate.status import print_status, round_rows

KEY = "fgk_status-test"
EDGES = [
    {
        "edge_id": "edge-1",
        "url": "http://127.0.0.1:9001",
        "device": "cpu",
        "models": {"digits": {"ready": [1, 2], "failed": {}}},
        "outstanding": 1,
        "pending": 0,
        "served": 42,
        "failures": 0,
        "ejected": False,
        "ejected_for_s": 0,
        "last_seen_s": 0.25,
    },
    {
        "edge_id": "edge-2",
        "url": "http://127.0.0.1:9002",
        "device": "cuda",
        "models": {"digits": {"ready": [1], "failed": {}}},
        "outstanding": 0,
        "pending": 0,
        "served": 7,
        "failures": 3,
        "ejected": True,
        "ejected_for_s": 4.6,
        "last_seen_s": 1.0,
    },
]
LINEAGE = {
    "model": "digits",
    "version": 2,
    "parent_version": 1,
    "round": 3,
    "digest": "ab" * 32,
    "strategy": "fedavgm",
    "contributors": [],
    "samples": 120,
    "accuracy": 0.9123,
    "loss": 0.31,
    "epsilon": None,
    "created_ts": 1.0,
}
ROUND = {
    "model": "digits",
    "round": 3,
    "mode": "sync",
    "outcome": "released",
    "reason": "candidate beats serving",
    "base_version": 1,
    "released_version": 2,
    "opened_ts": 1.0,
    "closed_ts": 2.0,
    "contributors": [{"edge_id": "edge-1", "samples": 120, "base_version": 1, "weight": 1.0}],
    "accuracy": 0.9123,
    "loss": 0.31,
}
ANSWERS: dict[str, tuple[int, Any]] = {
    "/v1/edges": (200, {"edges": EDGES, "ts": 0}),
    "/v1/models/digits/versions": (200, {"model": "digits", "versions": [LINEAGE]}),
    "/v1/models/digits/rounds?limit=10": (
        200,
        {"model": "digits", "rounds": [ROUND], "open": ROUND | {"round": 4, "state": "open"}},
    ),
    "/v1/models/digits/rollouts": (
        403,
        {"error": "API key 'viewer' has role 'infer'; needs 'admin'"},
    ),
}


class Stub(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            code, body = 401, {"error": "unknown API key"}
        else:
            code, body = ANSWERS.get(self.path, (404, {"error": "Not Found"}))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run(url: str, key_file: Path, **options: Any) -> list[str]:
    lines: list[str] = []
    assert print_status(url, lines.append, key_file, **options) == 0
    return lines


def test_tables_of_fleet_versions_rounds_and_rollouts(gateway: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    text = "\n".join(run(gateway, key_file))
    assert (
        "Fleet\n"
        "  edge    device  health      models (ready versions)  outstanding  served  seen\n"
        "  ------- ------- ----------- ------------------------ ------------ ------- ----\n"
        "  edge-1  cpu     ok          digits v1,v2                       1      42  0.2s\n"
        "  edge-2  cuda    ejected 5s  digits v1                          0       7  1.0s\n"
    ) in text
    assert "2 edge(s)" in text
    assert (
        "Versions of digits\n"
        "  version  parent  round  strategy  samples  accuracy  served by\n"
        "  -------- ------- ------ --------- -------- --------- --------------\n"
        "  v1       -           -  -               -         -  edge-1, edge-2\n"
        "  v2       v1          3  fedavgm       120     0.912  edge-1\n"
        "  (accuracy: higher is better)\n"
    ) in text
    assert (
        "Rounds of digits (last 10)\n"
        "  round  mode  outcome   versions  edges  accuracy   loss  reason\n"
        "  ------ ----- --------- --------- ------ --------- ------ -----------------------\n"
        "      3  sync  released  v1 -> v2      1     0.912  0.310  candidate beats serving\n"
        "  (accuracy: higher is better)\n"
        "  round 4 open (sync, from v1)\n"
    ) in text
    assert "\x1b" not in text  # plain: no colour or cursor codes
    assert "Rollouts of digits\n  (needs an admin key: API key 'viewer' has role" in text


def test_a_model_without_apis_and_a_refused_key(gateway: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    text = "\n".join(run(gateway, key_file, model="cats"))
    assert "Versions of cats\n  (this gateway has no such API)" in text
    write_secret(key_file, "fgk_wrong")
    with pytest.raises(FedgateError, match="answered 401: unknown API key"):
        run(gateway, key_file)


def test_unreachable_gateway(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    with pytest.raises(FedgateError, match="cannot reach the gateway"):
        run("http://127.0.0.1:9", key_file)


def test_default_key_prefers_the_local_admin_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDGATE_API_KEY", raising=False)
    assert status.api_key(None) is None
    write_secret(tmp_path / ".fedgate/secrets/gateway-infer.key", "fgk_infer")
    assert status.api_key(None) == "fgk_infer"
    write_secret(tmp_path / ".fedgate/secrets/gateway-admin.key", "fgk_admin")
    assert status.api_key(None) == "fgk_admin"
    monkeypatch.setenv("FEDGATE_API_KEY", "fgk_env")
    assert status.api_key(None) == "fgk_env"


def test_render_table_aligns_numbers_right() -> None:
    lines = render_table(("name", "n", "x"), [["a", 1, 0.5], ["bbb", 10, None]])
    assert lines == ["name   n      x", "----- --- -----", "a      1  0.500", "bbb   10      -"]


def test_plain_tables_never_wrap_and_drop_control_characters() -> None:
    """A plain table is the same at any width (a pipe has none) and a gateway's text
    cannot put escape codes or rich markup into it."""
    reason = "held: " + "much worse than serving " * 10 + "\x1b[2J[bold]x[/bold]"
    lines = render_table(("round", "reason"), [[1, reason]])
    assert len(lines) == 3
    assert lines[2] == "    1  held: " + "much worse than serving " * 10 + "?[2J[bold]x[/bold]"


def test_status_drawn_for_a_terminal_shows_the_same_values_in_colour(
    gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")  # the terminal's width: rows fit on a line
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    lines: list[str] = []
    assert print_status(gateway, lines.append, key_file, fancy=True) == 0
    text = "\n".join(lines)
    assert "\x1b[" in text and "━━━" in text  # colour codes and a heavy rule
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert re.search(r"edge-2 +cuda +ejected 5s +digits v1 +0 +7 +1.0s", plain), plain
    assert "\x1b[31mejected 5s" in text and "\x1b[32mok" in text  # red and green states
    assert "(accuracy: higher is better)" in plain


def test_status_names_the_metric_and_its_direction(
    gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regression's rounds and versions show its metric (mae), which is lower-better."""
    lineage = LINEAGE | {"metric": "mae", "value": 46.78}
    record = ROUND | {"metric": "mae", "value": 46.78}
    answers = ANSWERS | {
        "/v1/models/digits/versions": (200, {"model": "digits", "versions": [lineage]}),
        "/v1/models/digits/rounds?limit=10": (200, {"rounds": [record], "open": None}),
    }
    monkeypatch.setattr(sys.modules[__name__], "ANSWERS", answers)
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    text = "\n".join(run(gateway, key_file))
    assert "  round  mode  outcome   versions  edges     mae   loss  reason\n" in text
    assert "      3  sync  released  v1 -> v2      1  46.780  0.310  candidate beats" in text
    assert "  (mae: lower is better)\n  no round open" in text
    assert "  v2       v1          3  fedavgm       120  46.780  edge-1\n" in text


def test_round_rows_show_secure_rounds_with_survivors_and_dropouts() -> None:
    base = {"mode": "sync", "outcome": "released", "base_version": 2, "reason": "ok"}
    plain = base | {"round": 3, "released_version": 3, "contributors": [{}, {}]}
    secure = base | {"round": 4, "secure": True, "survivors": 3, "dropped": 1, "contributors": []}
    rows = round_rows([secure, plain])  # newest first, as the API lists them
    assert [row[:5] for row in rows] == [
        [3, "sync", "released", "v2 -> v3", 2],
        [4, "sync secure", "released", "v2", "3 (1 dropped)"],
    ]


def test_rounds_show_the_models_own_metric() -> None:
    from fedgate.status import metric_name, round_rows

    record = {
        "round": 2,
        "mode": "sync",
        "outcome": "released",
        "base_version": 1,
        "released_version": 2,
        "contributors": [],
        "reason": "ok",
        "loss": 3000.0,
        "metric": "mae",
        "value": 46.78,
        "serving_value": 56.06,
        "evaluation": "central",
    }
    assert metric_name([record]) == "mae"
    assert round_rows([record])[0][5] == 46.78
    legacy = {k: v for k, v in record.items() if k not in ("metric", "value")} | {"accuracy": 0.9}
    assert metric_name([legacy]) == "accuracy" and round_rows([legacy])[0][5] == 0.9
