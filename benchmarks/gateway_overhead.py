"""What the gateway costs: the same wrk load against Triton directly and through the gateway.

One run starts a real tritonserver serving ``digits`` (signed version 1, python backend,
CPU), nats-server, and the gateway exactly as ``fedgate up`` runs it (``python -m
gateway``: one uvicorn worker, uvloop, httptools, the infer fast path, an API key checked
and rate-limited on every request, metrics on). The edge's heartbeats are published by
this script. With HAProxy on the PATH it is measured too, as the native-proxy reference.

For concurrency 1, 16 and 64 and for JSON and binary-tensor requests (one 1x64 FP32
digit; binary output for binary requests) it runs wrk (one thread) against each target,
interleaved over several rounds so that a noisy neighbour hurts all targets alike, and
prints medians: throughput ratio to direct Triton, and the p50/p99 latency the gateway
adds. wrk is the load generator (``apt-get install -y wrk`` on Debian); without it the
script says so and exits 2.

    .venv/bin/python benchmarks/gateway_overhead.py [--duration 4] [--rounds 5] [--quick]

``--baseline DIR`` also runs the gateway of another source tree (for example
``git archive <commit> | tar -x -C DIR``) beside this one, against the same Triton, and
measures it interleaved with the others: the "baseline" columns are its throughput ratio
to direct Triton and its CPU per request, from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROW = [round(0.1 * (i % 16), 3) for i in range(64)]
LUA = """
local f = io.open(os.getenv("FG_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"
local hl = os.getenv("FG_HLEN")
if hl and hl ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = hl
  wrk.headers["Content-Type"] = "application/octet-stream"
else
  wrk.headers["Content-Type"] = "application/json"
end
local key = os.getenv("FG_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
"""
TARGET_C16 = 0.45
TARGET_ADDED_P50_MS = 0.35


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float | None = None  # gateway CPU per request, when measured


@dataclass
class Bench:
    """The processes under test and where to reach them."""

    root: Path
    procs: list[object] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)  # target name -> base URL
    gateway_pid: int = 0
    pids: dict[str, int] = field(default_factory=dict)  # gateway target -> its pid
    key: str = ""
    _beats: threading.Event = field(default_factory=threading.Event)
    _beater: threading.Thread | None = None

    def stop(self) -> None:
        self._beats.set()
        if self._beater is not None:
            self._beater.join(timeout=5)
        for proc in reversed(self.procs):
            proc.stop()  # type: ignore[attr-defined]


def build_model(root: Path) -> tuple[Path, str]:
    """A signed version 1 of digits (briefly trained, as ``fedgate up`` bootstraps it)."""
    from fedcore.keys import generate_ed25519, public_hex
    from fedcore.models import get_spec
    from trainer.bootstrap import train_seed_model, write_version

    key = generate_ed25519(root / "keys" / "signing.key")
    spec = get_spec("digits")
    params = train_seed_model(spec, fraction=0.2, epochs=1, seed=0)
    write_version(spec, params, root / "artifacts" / "digits" / "1", key, version=1)
    return root / "artifacts", public_hex(key)


def start_triton(bench: Bench) -> str:
    from edge_runtime.repository import prepare_model
    from edge_runtime.triton import TritonServer
    from fedcore.keys import ed25519_public_from_hex
    from fedcore.process import free_port

    artifacts, public = build_model(bench.root)
    repo = bench.root / "repo"
    prepare_model(repo, artifacts, "digits", "KIND_CPU", ed25519_public_from_hex(public))
    triton = TritonServer(
        name="tritonserver[bench]",
        repository=repo,
        work_dir=bench.root / "triton",
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        control_secret="bench-control",
        exit_timeout_s=5,
    )
    triton.start(120)
    bench.procs.append(triton)
    triton.load("digits")
    bench.urls["direct"] = triton.url
    return triton.url


def start_nats(bench: Bench) -> tuple[str, dict[str, Path]]:
    from fedcore.keys import write_secret
    from fedcore.process import ManagedProcess, free_port
    from fedgate.natsconf import render_nats_config, write_nats_config

    port, monitor = free_port(), free_port()
    users = {"gateway": "gw-" + os.urandom(8).hex(), "bench": "bench-" + os.urandom(8).hex()}
    files = {}
    for user, password in users.items():
        files[user] = bench.root / "secrets" / f"nats-{user}.pass"
        write_secret(files[user], password)
    conf = bench.root / "nats.conf"
    text = render_nats_config(
        host="127.0.0.1",
        port=port,
        monitor_port=monitor,
        store_dir=bench.root / "js",
        users=users,
    )
    write_nats_config(conf, text)
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
    proc = ManagedProcess("nats-server", [binary, "-c", str(conf)], log_path=bench.root / "n.log")
    proc.start()
    bench.procs.append(proc)
    proc.wait_ready(lambda: _ok(f"http://127.0.0.1:{monitor}/healthz"), 30)
    return f"nats://127.0.0.1:{port}", files


def heartbeat(bench: Bench, nats_url: str, password: str, edge_url: str, fleet: int = 1) -> None:
    """Publish edge-1's heartbeat every second from a thread, as its edge runtime would,
    and those of ``fleet - 1`` simulated edges (serving another model, at URLs nothing
    listens on: they fill the gateway's fleet without taking digits requests).

    Every edge is enrolled first (the registry mirrored into KV, as the trainer does): the
    gateway accepts heartbeats only from active enrolled edges.
    """
    import nats
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fedcore import subjects
    from fedcore.enrollment import EdgeRegistry
    from fedcore.wire import Heartbeat, ModelState
    from trainer.registry import mirror_registry

    def public() -> str:
        return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()

    sims = [f"sim-{i:04d}" for i in range(fleet - 1)]
    registry = EdgeRegistry().enroll("edge-1", public())
    for sim in sims:
        registry = registry.enroll(sim, public())

    async def beat() -> None:
        nc = await nats.connect(nats_url, user="bench", password=password)
        await mirror_registry(nc.jetstream(), registry)
        seq = 0
        while not bench._beats.is_set():
            seq += 1
            msg = Heartbeat(
                edge_id="edge-1",
                url=edge_url,
                seq=seq,
                ts=time.time(),
                models={"digits": ModelState(ready=[1])},
            )
            await nc.publish(subjects.heartbeat("edge-1"), msg.encode())
            for i, sim in enumerate(sims):
                other = {"wide": ModelState(ready=[1])}
                beat = Heartbeat(edge_id=sim, url=f"http://127.0.0.1:{20000 + i}", seq=seq,
                                 ts=time.time(), models=other)  # fmt: skip
                await nc.publish(subjects.heartbeat(sim), beat.encode())
            for _ in range(10):
                if bench._beats.is_set():
                    break
                await asyncio.sleep(0.1)
        await nc.close()

    bench._beater = threading.Thread(target=lambda: asyncio.run(beat()), daemon=True)
    bench._beater.start()


def start_gateway(
    bench: Bench,
    nats_url: str,
    files: dict[str, Path],
    name: str = "gateway",
    tree: Path | None = None,
) -> str:
    from fedcore.keys import write_secret
    from fedcore.process import ManagedProcess, free_port
    from gateway.auth import generate_key, key_line

    bench.key = bench.key or generate_key()
    keys_file = bench.root / "secrets" / "api-keys"
    write_secret(keys_file, key_line("infer", "bench", bench.key, rate_per_s=1e9))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    settings = {
        "PORT": str(port),
        "NATS_URL": nats_url,
        "NATS_USER": "gateway",
        "NATS_PASSWORD_FILE": str(files["gateway"]),
        "API_KEYS_FILE": str(keys_file),
        "LOG_LEVEL": "WARNING",
    }
    if tree is None:  # this tree mints a feedback token on every response
        secret = bench.root / "secrets" / "feedback-secret"
        write_secret(secret, generate_key())
        settings["FEEDBACK_SECRET_FILE"] = str(secret)
    env.update({f"FEDGATE_GATEWAY_{k}": v for k, v in settings.items()})
    argv = [sys.executable, "-m", "gateway"]  # from ``tree`` when given (cwd comes first)
    log = bench.root / f"{name}.log"
    proc = ManagedProcess(name, argv, log_path=log, env=env, cwd=tree)
    proc.start()
    bench.procs.append(proc)
    bench.pids[name] = proc.pid or 0
    bench.gateway_pid = bench.pids.get("gateway", 0)
    url = f"http://127.0.0.1:{port}"
    proc.wait_ready(lambda: _routed(url, bench.key), 30)
    bench.urls[name] = url
    return url


def start_haproxy(bench: Bench, triton_url: str) -> None:
    from fedcore.process import ManagedProcess, free_port

    binary = shutil.which("haproxy")
    if binary is None:
        return
    port = free_port()
    conf = bench.root / "haproxy.cfg"
    conf.write_text(
        "global\n  maxconn 4096\n  nbthread 1\n"
        "defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n"
        "  timeout server 30s\n  option http-keep-alive\n"
        f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
        f"backend be\n  http-reuse always\n  server t1 {triton_url.removeprefix('http://')}\n"
    )
    proc = ManagedProcess(
        "haproxy", [binary, "-db", "-f", str(conf)], log_path=conf.with_suffix(".log")
    )
    proc.start()
    bench.procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    proc.wait_ready(lambda: _ok(url + "/v2/health/ready"), 10)
    bench.urls["haproxy"] = url


def _ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def _routed(url: str, key: str) -> bool:
    return _ok(url + "/v2/models/digits/versions/1/ready", {"Authorization": f"Bearer {key}"})


def write_payloads(root: Path) -> dict[str, tuple[Path, str]]:
    """Request bodies: (file, Inference-Header-Content-Length or "") per encoding."""
    tensor = {"name": "pixels", "shape": [1, 64], "datatype": "FP32"}
    json_body = json.dumps({"inputs": [{**tensor, "data": ROW}]}).encode()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": 256}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    (root / "json.body").write_bytes(json_body)
    (root / "binary.body").write_bytes(header + struct.pack("<64f", *ROW))
    (root / "post.lua").write_text(LUA)
    return {"json": (root / "json.body", ""), "binary": (root / "binary.body", str(len(header)))}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wrk(bench: Bench, target: str, payload: tuple[Path, str], conc: int, secs: int) -> Run:
    url = bench.urls[target] + "/v2/models/digits/versions/1/infer"
    env = dict(os.environ, FG_BODY=str(payload[0]), FG_HLEN=payload[1])
    env["FG_KEY"] = bench.key if target in bench.pids else ""
    argv = [
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{secs}s",
        "--latency",
        "-s",
        str(bench.root / "post.lua"),
    ]
    pid = bench.pids.get(target, 0)
    ticks = _cpu_ticks(pid) if pid else 0
    out = subprocess.run([*argv, url], env=env, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu = None
    if pid and requests:
        hz = os.sysconf("SC_CLK_TCK")
        cpu = (_cpu_ticks(pid) - ticks) / hz / requests * 1e6
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Run(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        errors=int(errors.group(1)) if errors else 0,
        cpu_us=cpu,
    )


Cell = tuple[int, str, str]  # concurrency, encoding, target


def measure(bench: Bench, args: argparse.Namespace) -> dict[Cell, list[Run]]:
    payloads = write_payloads(bench.root)
    targets = list(bench.urls)
    for target in targets:  # warm up connections, caches and Triton's batcher
        for payload in payloads.values():
            wrk(bench, target, payload, 16, 1)
    runs: dict[Cell, list[Run]] = {}
    for round_no in range(args.rounds):
        for conc in args.concurrency:
            for encoding, payload in payloads.items():
                for target in targets:
                    run = wrk(bench, target, payload, conc, args.duration)
                    runs.setdefault((conc, encoding, target), []).append(run)
        print(f"  round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    return runs


def median(runs: list[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def paired(a: list[Run], b: list[Run], attr: str, ratio: bool) -> float:
    """Median over rounds of a/b (or a-b): each round's runs were back to back, so a busy
    neighbour weighs on both sides of each pair alike."""
    pairs = zip(a, b, strict=True)
    values = [
        getattr(x, attr) / getattr(y, attr) if ratio else getattr(x, attr) - getattr(y, attr)
        for x, y in pairs
    ]
    return float(statistics.median(values))


def report(runs: dict[Cell, list[Run]], args: argparse.Namespace, targets: list[str]) -> bool:
    """Print the table and whether the targets are met; True if both are met."""
    haproxy = "haproxy" in targets
    baseline = "baseline" in targets
    head = f"{'conc':>4} {'body':<6} {'direct rps':>10} {'gateway rps':>11} {'ratio':>6}"
    head += f" {'haproxy':>8}" if haproxy else ""
    head += f" {'baseline':>8} {'base CPU':>8}" if baseline else ""
    head += f" | {'p50 direct':>10} {'p50 gw':>7} {'added':>6} | {'p99 direct':>10} {'p99 gw':>7}"
    print(head + f" {'added':>6} | {'gw CPU/req':>10}")
    measured: dict[tuple[int, str], tuple[float, float]] = {}
    for conc in args.concurrency:
        for encoding in ("json", "binary"):
            d, g = runs[(conc, encoding, "direct")], runs[(conc, encoding, "gateway")]
            ratio = paired(g, d, "rps", ratio=True)
            added50 = paired(g, d, "p50_ms", ratio=False)
            added99 = paired(g, d, "p99_ms", ratio=False)
            measured[(conc, encoding)] = (ratio, added50)
            row = f"{conc:>4} {encoding:<6} {median(d, 'rps'):>10.0f} {median(g, 'rps'):>11.0f}"
            row += f" {ratio:>5.2f}x"
            if haproxy:
                row += f" {paired(runs[(conc, encoding, 'haproxy')], d, 'rps', True):>7.2f}x"
            if baseline:
                b = runs[(conc, encoding, "baseline")]
                row += f" {paired(b, d, 'rps', True):>7.2f}x {median(b, 'cpu_us'):>5.0f} us"
            row += f" | {median(d, 'p50_ms'):>7.2f} ms {median(g, 'p50_ms'):>7.2f} {added50:>+6.2f}"
            row += f" | {median(d, 'p99_ms'):>7.2f} ms {median(g, 'p99_ms'):>7.2f} {added99:>+6.2f}"
            print(row + f" | {median(g, 'cpu_us'):>7.0f} us")
    errors = sum(r.errors for cell in runs.values() for r in cell)
    print(f"non-2xx responses in all runs: {errors}")
    print(
        "ratio and added latency: medians over rounds of gateway vs direct run back to back; "
        "rps and latency columns: medians"
    )
    return _meets_targets(measured, args) and errors == 0


def _meets_targets(
    measured: dict[tuple[int, str], tuple[float, float]], args: argparse.Namespace
) -> bool:
    if 16 not in args.concurrency or 1 not in args.concurrency:
        return True
    ok = True
    for encoding in ("json", "binary"):
        ratio, added = measured[(16, encoding)][0], measured[(1, encoding)][1]
        met = ratio >= TARGET_C16 and added <= TARGET_ADDED_P50_MS
        ok = ok and met
        print(
            f"target ({encoding}): >= {TARGET_C16}x direct throughput at c=16: {ratio:.2f}x; "
            f"<= {TARGET_ADDED_P50_MS} ms added p50 at c=1: {added:.2f} ms -> "
            f"{'met' if met else 'NOT met'}"
        )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy reference")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s")
    parser.add_argument("--fleet", type=int, default=1, help="edges in the gateway's fleet")
    parser.add_argument(
        "--baseline", type=Path, help="source tree of a gateway to measure beside this one"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: it is this benchmark's load generator. On Debian or Ubuntu: "
            "apt-get install -y wrk. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            return run(bench, args)
        finally:
            bench.stop()


def run(bench: Bench, args: argparse.Namespace) -> int:
    print("starting tritonserver, nats-server and the gateway ...", file=sys.stderr)
    triton_url = start_triton(bench)
    nats_url, files = start_nats(bench)
    heartbeat(bench, nats_url, files["bench"].read_text().strip(), triton_url, args.fleet)
    start_gateway(bench, nats_url, files)
    if args.baseline is not None:
        start_gateway(bench, nats_url, files, "baseline", args.baseline.resolve())
    if not args.no_haproxy:
        start_haproxy(bench, triton_url)
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    print("fedgate gateway overhead: the same wrk load against Triton directly and through it")
    print(
        f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}; "
        f"{(version.stdout or version.stderr).split(' [')[0].strip()}, 1 thread"
    )
    print(
        "model: digits, one 1x64 FP32 row per request, Triton 2.51 python backend on CPU; "
        "binary requests ask for binary output"
    )
    print(
        "gateway: python -m gateway, 1 uvicorn worker (uvloop, httptools, infer fast path), "
        "API key + rate limit + metrics on"
        + ("; haproxy: 1 thread, keep-alive, as reference" if "haproxy" in bench.urls else "")
    )
    print(f"{args.rounds} interleaved round(s) of {args.duration:g} s per cell; medians")
    print(f"fleet: edge-1 and {args.fleet - 1} simulated edges heartbeating every second")
    runs = measure(bench, args)
    met = report(runs, args, list(bench.urls))
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.2f}")
    if load > (os.cpu_count() or 1):
        print(
            "WARNING: the machine was busy with other work during the run (load average above "
            "the CPU count); the gateway's one thread suffers most from that: rerun when quiet"
        )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
