"""What a feedback label costs with many edges: asked of the whole fleet, or of the edge
that served the request (named by the response's feedback token).

One run starts nats-server and ``--edges`` simulated edges in this process, each a real
:class:`edge_runtime.feedback.FeedbackResponder` on its own NATS connection with its own
SQLite spool, filled by the capture code ``model.py`` runs (ids bound to the key, as the
gateway forwards them). The gateway app (``create_app``, with an API key and a feedback
secret) is driven in process through httpx's ASGI transport, its feedback relay bound to
the same nats-server: the HTTP server is left out, the relay and the edges are measured.

For each mode (``fleet``: no token; ``token``) it posts ``--labels`` labels for captured
ids, ``--concurrency`` at a time, interleaved over ``--rounds`` rounds, and prints the
p50/p99 latency of each mode, how many answers were not 200, and the ratio; then the
latency of a 404 (an id nobody holds) in each mode.

    .venv/bin/python benchmarks/feedback_latency.py [--edges 50] [--labels 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
from nats.aio.client import Client as NATS

from edge_runtime.feedback import FeedbackResponder
from edge_runtime.spool import Spool, spool_path
from fedcore.keys import write_secret
from fedcore.process import ManagedProcess, free_port
from fedcore.triton_model import capture_source
from gateway.app import create_app
from gateway.auth import generate_key, key_line
from gateway.feedback_token import HEADER, FeedbackTokens
from gateway.settings import GatewaySettings

KEY = generate_key()
PER_EDGE = 40


def start_nats(root: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
    argv = [binary, "-a", "127.0.0.1", "-p", str(port)]
    proc = ManagedProcess("nats-server", argv, log_path=root / "nats.log")
    proc.start()
    return proc, f"nats://127.0.0.1:{port}"


async def connect(url: str) -> NATS:
    for _ in range(100):
        try:
            return await nats.connect(url, max_reconnect_attempts=0)
        except Exception:  # not listening yet
            await asyncio.sleep(0.05)
    raise RuntimeError("nats-server did not start")


class Edges:
    """``n`` simulated edges: each a responder, a spool, and ``PER_EDGE`` captured ids."""

    def __init__(self, root: Path, n: int) -> None:
        namespace: dict[str, Any] = {"__name__": "capture"}
        exec(compile(capture_source(), "<capture>", "exec"), namespace)
        self.ids: list[tuple[str, str]] = []  # (edge, request id)
        self.spools: list[Spool] = []
        self.responders: list[FeedbackResponder] = []
        self.conns: list[NATS] = []
        params = json.dumps({"x-fedgate-key": "bench"})
        for e in range(n):
            edge = f"edge-{e}"
            path = spool_path(root / edge, "digits")
            path.parent.mkdir(parents=True)
            writer = namespace["CaptureWriter"](str(path), 1.0, 10000, 10000, version=1)
            for i in range(PER_EDGE):
                rid = f"req-{e}-{i}"
                x = np.full((1, 64), i, np.float32)
                writer.offer(namespace["bound_id"](rid, params), [x], [np.zeros((1, 10))])
                self.ids.append((edge, rid))
            writer.close()
            self.spools.append(Spool(path))
            self.responders.append(FeedbackResponder(edge, {"digits": self.spools[-1]}))

    async def start(self, url: str) -> None:
        for responder in self.responders:
            nc = await connect(url)
            self.conns.append(nc)
            await responder.start(nc)

    async def stop(self) -> None:
        for responder in self.responders:
            await responder.stop()
        for nc in self.conns:
            await nc.close()
        for spool in self.spools:
            spool.close()


async def post(http: httpx.AsyncClient, rid: str, token: bytes | None) -> tuple[float, int]:
    headers = {"authorization": f"Bearer {KEY}"}
    if token is not None:
        headers[HEADER] = token.decode()
    body = {"model": "digits", "id": rid, "label": 1}
    started = time.perf_counter()
    resp = await http.post("/v1/feedback", json=body, headers=headers)
    return time.perf_counter() - started, resp.status_code


async def measure(
    http: httpx.AsyncClient,
    batch: list[tuple[str, str]],
    tokens: FeedbackTokens | None,
    concurrency: int,
) -> list[tuple[float, int]]:
    slots = asyncio.Semaphore(concurrency)

    async def one(edge: str, rid: str) -> tuple[float, int]:
        token = tokens.mint("digits", edge, "bench") if tokens is not None else None
        async with slots:
            return await post(http, rid, token)

    return list(await asyncio.gather(*(one(e, r) for e, r in batch)))


def summary(name: str, runs: list[tuple[float, int]]) -> tuple[float, float]:
    ms = sorted(t * 1000 for t, _ in runs)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    bad = sum(1 for _, code in runs if code != 200)
    print(f"{name:>6}: p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  not 200: {bad}/{len(runs)}")
    return p50, p99


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="fedgate-feedback-"))
    proc, url = start_nats(root)
    edges = Edges(root, args.edges)
    try:
        await edges.start(url)
        gateway_nc = await connect(url)
        secret = root / "feedback.secret"
        write_secret(secret, generate_key())
        write_secret(root / "nats.pass", "unused")
        settings = GatewaySettings(
            nats_user="gateway",
            nats_password_file=root / "nats.pass",
            api_keys=key_line("infer", "bench", KEY, rate_per_s=1e9),
            feedback_secret_file=secret,
        )
        app = create_app(settings, bus=False)
        app.api.state.feedback.bind(gateway_nc)
        tokens = app.state.tokens
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        results: dict[str, list[tuple[float, int]]] = {"fleet": [], "token": []}
        rng = np.random.default_rng(0)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            for _ in range(args.rounds):
                picks = rng.choice(len(edges.ids), args.labels // args.rounds, replace=False)
                batch = [edges.ids[int(i)] for i in picks]
                for mode in ("fleet", "token"):
                    use = tokens if mode == "token" else None
                    results[mode] += await measure(http, batch, use, args.concurrency)
            print(
                f"{args.edges} edges, {args.labels} labels per mode, {args.concurrency} at a time"
            )
            fleet = summary("fleet", results["fleet"])
            token = summary("token", results["token"])
            print(f"token/fleet: p50 {token[0] / fleet[0]:.3f}  p99 {token[1] / fleet[1]:.3f}")
            for mode in ("fleet", "token"):
                use = (
                    tokens.mint("digits", "edge-0", "bench") if mode == "token" and tokens else None
                )
                runs = [await post(http, f"nobody-{i}", use) for i in range(5)]
                ms = statistics.median(t * 1000 for t, _ in runs)
                print(f"404 ({mode}): median {ms:.1f} ms, codes {sorted({c for _, c in runs})}")
        await gateway_nc.close()
    finally:
        await edges.stop()
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=50)
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
