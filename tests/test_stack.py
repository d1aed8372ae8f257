"""``fedgate up --edges 2`` as a user runs it: real nats-server, tritonservers, gateway.

The official ``tritonclient`` (sync and asyncio) is pointed at the gateway URL. After
SIGTERM nothing of the stack may be left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient

from fedcore.models import get_spec
from fedcore.params import load_flat
from fedcore.process import free_port
from tests.conftest import processes_mentioning

FEDGATE = [sys.executable, "-m", "fedgate.cli"]


@dataclass
class RunningStack:
    url: str
    data_dir: Path
    proc: subprocess.Popen[str]
    output: list[str]


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(
    options: list[str], port: int, data_dir: Path
) -> tuple[subprocess.Popen[str], list[str]]:
    """``fedgate up`` with ``options``, once it printed ``ready;`` (its output so far)."""
    proc = subprocess.Popen(
        [*FEDGATE, "up", *options, "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("ready;"):
            break
    if not output or not output[-1].startswith("ready;"):
        proc.kill()
        pytest.fail(f"fedgate up {' '.join(options)} did not become ready:\n" + "".join(output))
    return proc, output


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    port = free_port()
    proc, output = start_up(["--edges", "2"], port, data_dir)
    running = RunningStack(f"http://127.0.0.1:{port}", data_dir, proc, output)
    yield running
    if proc.poll() is None:
        proc.kill()


def torch_logits(data_dir: Path, x: np.ndarray) -> np.ndarray:
    module = get_spec("digits").build_module()
    load_flat(module, np.load(data_dir / "trainer" / "state" / "digits-1.npy", allow_pickle=False))
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def auth(stack: RunningStack) -> dict[str, str]:
    """The header the gateway wants: the local stack's infer key."""
    key = (stack.data_dir / "secrets" / "gateway-infer.key").read_text().strip()
    return {"Authorization": f"Bearer {key}"}


def test_up_prints_the_urls(stack: RunningStack) -> None:
    text = "".join(stack.output)
    assert f"gateway:  {stack.url}" in text
    assert "edge-1:" in text and "edge-2:" in text
    # the start-up wait, a line per step (stdout is a pipe: no live display, no escapes)
    assert "  waiting for the stack to start\n" in text and "\x1b" not in text
    steps = ["nats-server healthy", "version 1 of the models (the first start trains it)"]
    steps += ["edge-1: its Triton ready", "edge-2: its Triton ready"]
    steps += ["gateway routing to every edge", "ready"]
    found = [
        re.search(rf"^  the stack to start: {re.escape(s)} \(\d+s\)$", text, re.M) for s in steps
    ]
    assert all(found), text
    assert [m.start() for m in found if m] == sorted(m.start() for m in found if m)


def test_tritonclient_against_the_gateway(stack: RunningStack) -> None:
    client = httpclient.InferenceServerClient(stack.url.removeprefix("http://"))
    h = auth(stack)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits", headers=h) and client.is_model_ready("digits", "1", h)
    assert not client.is_model_ready("digits", "7", headers=h)
    meta = client.get_model_metadata("digits", headers=h)
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    _, _, x, _ = get_spec("digits").dataset()
    x = x[:32]
    expected = torch_logits(stack.data_dir, x)
    for binary in (False, True):
        inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("digits", [inp], outputs=[out], request_id=f"req-{binary}", headers=h)
        assert result.get_response()["id"] == f"req-{binary}"
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
        assert np.array_equal(result.as_numpy("logits").argmax(1), expected.argmax(1))
    versioned = client.infer("digits", [inp], model_version="1", headers=auth(stack))
    assert versioned.get_response()["model_version"] == "1"
    client.close()


async def test_asyncio_client_against_the_gateway(stack: RunningStack) -> None:
    client = aioclient.InferenceServerClient(stack.url.removeprefix("http://"))
    try:
        _, _, x, _ = get_spec("digits").dataset()
        inp = aioclient.InferInput("pixels", [8, 64], "FP32")
        inp.set_data_from_numpy(x[:8], binary_data=True)
        result = await client.infer("digits", [inp], headers=auth(stack))
        expected = torch_logits(stack.data_dir, x[:8])
        assert np.array_equal(result.as_numpy("logits").argmax(1), expected.argmax(1))
        assert await client.is_server_ready()
    finally:
        await client.close()


def test_requests_spread_over_both_edges_and_name_them(stack: RunningStack) -> None:
    body = (
        b'{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":['
        + b",".join([b"0.5"] * 64)
        + b"]}]}"
    )
    served = set()
    for _ in range(6):
        req = urllib.request.Request(
            stack.url + "/v2/models/digits/infer", data=body, method="POST", headers=auth(stack)
        )
        with urllib.request.urlopen(req) as resp:
            served.add(resp.headers["x-fedgate-edge"])
            assert resp.headers["x-fedgate-model-version"] == "1"
    assert served == {"edge-1", "edge-2"}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/cats/infer", "Request for unknown model: 'cats' is not found"),
        ("/v2/models/digits/versions/9/infer", "'digits' version 9 is not found"),
        ("/v2/models/digits/versions/x/infer", "not a positive integer"),
    ],
)
def test_unknown_models_get_404(stack: RunningStack, path: str, message: str) -> None:
    req = urllib.request.Request(stack.url + path, data=b"{}", method="POST", headers=auth(stack))
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 404
    assert message in info.value.read().decode()


def test_status_lists_the_fleet(stack: RunningStack) -> None:
    out = subprocess.run(
        [
            *FEDGATE,
            "status",
            "--url",
            stack.url,
            "--key-file",
            str(stack.data_dir / "secrets" / "gateway-infer.key"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "edge-1" in out.stdout and "edge-2" in out.stdout and "2 edge(s)" in out.stdout


def gateway_pid(stack: RunningStack) -> int:
    (pid,) = [
        p
        for p in descendants(stack.proc.pid)
        if Path(f"/proc/{p}/cmdline").read_bytes().endswith(b"-m\0gateway\0")
    ]
    return pid


def test_a_killed_service_is_restarted_and_status_shows_it(stack: RunningStack) -> None:
    """``fedgate up`` restarts the gateway after SIGKILL instead of stopping the stack,
    and ``fedgate status`` lists the restart (finding 1)."""
    killed = gateway_pid(stack)
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 60
    served = ""
    while time.monotonic() < deadline and not served:
        assert stack.proc.poll() is None, "fedgate up ended when one service died"
        time.sleep(0.5)
        try:
            req = urllib.request.Request(stack.url + "/v1/edges", headers=auth(stack))
            with urllib.request.urlopen(req, timeout=2) as resp:
                edges = json.loads(resp.read())["edges"]
            served = "ok" if len(edges) == 2 else ""
        except OSError:
            continue
    assert served, "the gateway did not come back"
    assert gateway_pid(stack) != killed
    out = subprocess.run(
        [*FEDGATE, "status", "--url", stack.url, "--data-dir", str(stack.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "FEDGATE_API_KEY": auth(stack)["Authorization"].split()[1]},
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:10] if line}
    assert rows["gateway"][1:2] == ["running"] and rows["gateway"][3] == "1", out.stdout
    assert "killed by SIGKILL" in out.stdout
    assert rows["nats-server"][3] == "0" and rows["edge-1"][3] == "0", out.stdout


def test_zz_sigterm_stops_everything(stack: RunningStack) -> None:
    children = descendants(stack.proc.pid)
    assert len(children) >= 7  # nats, trainer, 2 edges, 2 tritonservers, 2 stubs, gateway
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=90) == 0
    leftovers = [p for p in children if alive(p)]
    assert leftovers == [], leftovers
    assert processes_mentioning(str(stack.data_dir)) == []
    assert not os.path.exists(f"/proc/{stack.proc.pid}")
