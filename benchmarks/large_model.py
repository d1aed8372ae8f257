"""Rounds of a model of real size: where time and memory go, per model size.

For each size (``--params``, millions; the model is ``wide``, :mod:`fedcore.models.wide`)
one round with ``--edges`` edges runs over a real nats-server (1 MiB ``max_payload``, the
NATS default, so every update goes through the object store behind a pointer). Every edge
and the trainer are separate processes (this script with ``--role``): each peak RSS is its own:

- edge: load the base model, fine-tune one epoch on 256 digits samples (``train``), seal
  the FP32 delta (HPKE + Ed25519, ``seal``), publish it (object store + pointer,
  ``put``); edges run one after the other;
- trainer: the trainer's own ``UpdateIngestor`` and ``RoundDriver`` (FedAvg, the default
  per-update bounds with their warm-up of 3 held updates, a checkpoint per fold): the
  object store get of each update is timed apart (``get``), the rest of handling it
  (verify, decrypt, decode, bound, fold, checkpoint: ``aggregate``); then the release
  (finalize, export ONNX and check it against torch with ONNX Runtime in a forked
  child, sign, verify, upload to the object store: ``release``);
- rollout: a fresh edge process downloads the released version from the object store
  and verifies it (``rollout``; Triton's load is not included).

Printed: seconds per step (edge steps: mean over edges; ``transfer`` = put + get per
update); the trainer's peak RSS after ingesting and after releasing, and after releasing
a round of twice the updates (the same edges publishing again under other ids: memory
must not grow with the number of updates), and with the central release gate's scoring
(candidate and serving version in torch on the digits test split, as ``trainer/release.py``
``_gate`` does where the trainer has evaluation data; run after the release here, with
what the gate holds: the candidate, the round's sum given back by ``finalize``, the
serving version mapped from its file; its own peak, ``VmHWM`` reset before it, where the
other trainer columns are the process's peak so far, and its rise over what was resident
when it began); the peak RSS of the edge that trained, sealed
and published, and of the one that rolled the version out (no torch there: plain MB); the
peak RSS of the trainer's export child (forked: its RSS counts pages shared with the trainer).
Each other RSS also as (RSS - floor) over the model's FP32 size, the floor being a process
that imported torch, onnx, onnxruntime, nats and the trainer's ingest (no model).

Run: ``.venv/bin/python benchmarks/large_model.py`` (sizes 1, 8, 25 M parameters; about
10 minutes on 2 cores); ``--params 25`` for the 25M model alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MB = 1e6
MAX_PAYLOAD = 1024 * 1024  # the NATS default: every update goes through the object store


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux


def new_peak() -> None:
    """Start a new peak of this process's resident set (``VmHWM``; Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_mb() -> float:
    """The peak resident set since :func:`new_peak` (``VmHWM``), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmHWM")


# -- roles (child processes) ----------------------------------------------------------
def load_keys(path: Path) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

    raw = json.loads(path.read_text())
    return {
        "hpke": x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(raw["hpke"])),
        "trainer": ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw["trainer"])),
        "edges": {
            e: ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k))
            for e, k in raw["edges"].items()
        },
    }


def base_module(hidden: int) -> Any:
    import torch

    from fedcore.models.wide import build_wide_module

    torch.manual_seed(0)
    return build_wide_module(hidden)


async def edge_role(a: argparse.Namespace) -> dict[str, float]:
    import nats
    import torch

    from edge_runtime.publisher import UpdatePublisher
    from fedcore.compression import CompressionSettings, encode_update, sizes_from_layout
    from fedcore.envelope import seal_update
    from fedcore.models.digits import train_test_split_digits
    from fedcore.params import flatten, layout

    keys = load_keys(Path(a.keys))
    module = base_module(a.hidden)
    sizes = sizes_from_layout(layout(module))
    before = flatten(module)
    x, y, _, _ = train_test_split_digits()
    rng = np.random.default_rng(int(a.edge.rsplit("-", 1)[1]))
    pick = rng.choice(len(x), 256, replace=False)
    t0 = time.perf_counter()
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    xs, ys = torch.from_numpy(x[pick]), torch.from_numpy(y[pick])
    for i in range(0, 256, 32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xs[i : i + 32]), ys[i : i + 32]).backward()
        opt.step()
    delta = flatten(module) - before
    del before, opt
    t1 = time.perf_counter()
    nc = await nats.connect(a.url, user="bench", password=a.password)
    publisher = UpdatePublisher.for_connection(nc, ack_timeout_s=30.0)
    out = {"train": t1 - t0, "seal": 0.0, "put": 0.0}
    for copy in range(a.copies):
        edge_id = a.edge if copy == 0 else f"{a.edge}-c{copy}"
        t1 = time.perf_counter()
        payload = encode_update(delta, sizes, CompressionSettings(mode="none")).data
        _, envelope = seal_update(
            payload,
            recipient=keys["hpke"].public_key(),
            signer=keys["edges"][edge_id],
            model="wide",
            round=1,
            edge_id=edge_id,
            base_version=1,
            base_digest="0" * 64,
            num_samples=256,
        )
        del payload
        t2 = time.perf_counter()
        await publisher.publish(envelope)
        del envelope
        t3 = time.perf_counter()
        if copy == 0:
            out["seal"], out["put"] = t2 - t1, t3 - t2
    await nc.close()
    return out | {"rss": peak_rss_mb()}


class Registry:
    """The enrolled edges (the trainer's ``EdgeDirectory``)."""

    def __init__(self, publics: dict[str, Any]) -> None:
        from fedcore.enrollment import EdgeRegistry

        registry = EdgeRegistry()
        for edge, key in publics.items():
            registry = registry.enroll(edge, key.public_bytes_raw().hex())
        self.registry = registry

    def current(self) -> Any:
        return self.registry


def central_gate(spec: Any, candidate: Any, serving: Any, eval_x: Any, eval_y: Any) -> None:
    """The central gate's scoring (``trainer/release.py`` ``_gate``, where the trainer has
    evaluation data): candidate and serving version in torch on the digits test split
    (loaded before, as the trainer holds its evaluation set from its start)."""
    from trainer.evaluate import evaluate_scores

    evaluate_scores(spec, candidate, eval_x, eval_y)
    evaluate_scores(spec, serving, eval_x, eval_y)


async def trainer_role(a: argparse.Namespace) -> dict[str, float]:
    """The trainer's own ingest path (``UpdateIngestor`` into ``RoundDriver``: verify,
    decrypt, decode, bounds, fold, checkpoint) and its release steps."""
    import nats
    from prometheus_client import CollectorRegistry

    from fedcore.artifact import verify_version_dir
    from fedcore.artifact_store import upload_version
    from fedcore.compression import sizes_from_layout
    from fedcore.models.wide import wide_spec
    from fedcore.params import flatten, layout, load_weights_file
    from fedcore.transport import UpdatePointer, is_pointer
    from trainer.bootstrap import write_version
    from trainer.driver import RoundDriver
    from trainer.ingest import Disposition, IngestOptions, UpdateIngestor
    from trainer.ingest_metrics import IngestMetrics
    from trainer.ledger import UpdateLedger
    from trainer.opener import StoreObjects
    from trainer.rounds import RoundBook, RoundPolicy
    from trainer.strategies import get_strategy

    keys = load_keys(Path(a.keys))
    module = base_module(a.hidden)
    sizes = tuple(sizes_from_layout(layout(module)))
    state = Path(a.workdir) / f"trainer-{os.getpid()}"
    state.mkdir()
    np.save(state / "weights.npy", flatten(module), allow_pickle=False)
    del module
    book = RoundBook(
        "wide",
        RoundPolicy(min_updates=a.updates),
        get_strategy("fedavg"),
        version=1,
        digest="0" * 64,
        params=load_weights_file(state / "weights.npy", mapped=True),  # as build_book does
    )
    book.open(sorted(keys["edges"]))
    driver = RoundDriver({"wide": book}, state, {"wide": sizes})
    nc = await nats.connect(a.url, user="bench", password=a.password)
    js = nc.jetstream()
    ingestor = UpdateIngestor(
        js,
        recipient=keys["hpke"],
        edges=Registry({e: k.public_key() for e, k in keys["edges"].items()}),
        rounds=driver,
        aggregator=driver,
        ledger=await UpdateLedger.open(js),
        metrics=IngestMetrics(CollectorRegistry()),
        options=IngestOptions(
            max_update_bytes=1 << 31, ack_wait_s=300.0, durable=f"bench-{os.getpid()}"
        ),
    )
    await ingestor.bind()
    get = handle = 0.0
    for _ in range(a.updates):
        (msg,) = await ingestor.fetch(1, 120.0)
        if is_pointer(msg.data):  # the transfer alone, timed apart from the pipeline
            # with the trainer's own reader (what ingest.handle reads with), so that
            # aggregate = handle - get is the pipeline without the transfer; the buffer is
            # freed (unmapped: far above the mmap threshold) before handle reads it again
            pointer = UpdatePointer.decode(msg.data)
            t0 = time.perf_counter()
            read = await StoreObjects(js, 120.0).read(pointer)
            get += time.perf_counter() - t0
            del read
        t0 = time.perf_counter()
        outcome = await ingestor.handle(msg)
        handle += time.perf_counter() - t0
        assert outcome.disposition is Disposition.ACCEPTED, outcome
    ingest_rss = peak_rss_mb()
    t3 = time.perf_counter()
    candidate = book.finalize()
    directory = state / "artifacts" / "2"
    spec = wide_spec(a.hidden)
    await asyncio.to_thread(write_version, spec, candidate, directory, keys["trainer"], version=2)
    verify_version_dir(  # as trainer/release.py: the export child checked the ONNX file
        directory, keys["trainer"].public_key(), model="wide", version=2, check_onnx=False
    )
    await upload_version(js, "wide", 2, directory)
    t4 = time.perf_counter()
    release_rss = peak_rss_mb()
    from fedcore.models.digits import train_test_split_digits

    _, _, eval_x, eval_y = train_test_split_digits()
    new_peak()  # the gate's own peak, not the ingest's before it
    pre_gate = hwm_mb()  # what is resident when the gate starts
    central_gate(spec, candidate, book.params, eval_x, eval_y)
    await nc.close()
    shutil.rmtree(state)
    return {
        "get": get,
        "aggregate": handle - get,
        "release": t4 - t3,
        "ingest_rss": ingest_rss,
        "rss": release_rss,
        "gate_rss": hwm_mb(),
        "pre_gate_rss": pre_gate,
        "export_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB,
    }


async def rollout_role(a: argparse.Namespace) -> dict[str, float]:
    """An edge takes the released version: download it from the object store, verify its
    signature and digests (what ``edge_runtime.rollout`` does before staging it)."""
    import nats

    from fedcore.artifact import verify_version_dir
    from fedcore.artifact_store import download_version

    keys = load_keys(Path(a.keys))
    nc = await nats.connect(a.url, user="bench", password=a.password)
    dest = Path(a.workdir) / f"rollout-{os.getpid()}"
    t0 = time.perf_counter()
    await download_version(nc.jetstream(), "wide", 2, dest, max_bytes=1 << 31)
    verify_version_dir(dest, keys["trainer"].public_key(), model="wide", version=2)
    took = time.perf_counter() - t0
    await nc.close()
    shutil.rmtree(dest)
    return {"rollout": took, "rss": peak_rss_mb()}


def floor_role(a: argparse.Namespace) -> dict[str, float]:
    """What a process holds before any model: the imports of the trainer's path."""
    import nats  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    import trainer.ingest  # noqa: F401
    from fedcore.models.wide import wide_spec

    wide_spec(1).build_module()
    return {"rss": peak_rss_mb()}


# -- the driver ---------------------------------------------------------------------
def child(role: str, **extra: Any) -> dict[str, float]:
    argv = [sys.executable, __file__, "--role", role]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{role} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def start_nats(root: Path) -> tuple[Any, str, str]:
    import urllib.request

    from fedcore.process import ManagedProcess, free_port
    from fedgate.natsconf import render_nats_config, write_nats_config

    port, monitor, password = free_port(), free_port(), os.urandom(12).hex()
    conf = root / "nats.conf"
    text = render_nats_config(
        host="127.0.0.1",
        port=port,
        monitor_port=monitor,
        store_dir=root / "js",
        users={"bench": password},
        max_payload=MAX_PAYLOAD,
    )
    write_nats_config(conf, text)
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
    proc = ManagedProcess("nats-server", [binary, "-c", str(conf)], log_path=root / "n.log")
    proc.start()

    def ok() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=2) as r:
            return int(r.status) == 200

    proc.wait_ready(ok, 30)
    return proc, f"nats://127.0.0.1:{port}", password


async def fresh_transport(url: str, password: str) -> None:
    import nats

    from fedcore.transport import UPDATES_OBJECT_BUCKET, UPDATES_STREAM, StreamSpec
    from trainer.bus import ensure_transport

    nc = await nats.connect(url, user="bench", password=password)
    js = nc.jetstream()
    for delete in (js.delete_stream(UPDATES_STREAM), js.delete_object_store(UPDATES_OBJECT_BUCKET)):
        with contextlib.suppress(Exception):  # not there yet
            await delete
    await ensure_transport(js, StreamSpec(max_msg_size=nc.max_payload))
    await nc.close()


async def fresh_ledger(url: str, password: str) -> None:
    import nats

    from fedcore.transport import LEDGER_BUCKET

    nc = await nats.connect(url, user="bench", password=password)
    with contextlib.suppress(Exception):  # not there yet
        await nc.jetstream().delete_key_value(LEDGER_BUCKET)
    await nc.close()


def write_keys(path: Path, edges: list[str]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

    def hexed(k: Any) -> str:
        return str(k.private_bytes_raw().hex())

    path.write_text(
        json.dumps(
            {
                "hpke": hexed(x25519.X25519PrivateKey.generate()),
                "trainer": hexed(ed25519.Ed25519PrivateKey.generate()),
                "edges": {e: hexed(ed25519.Ed25519PrivateKey.generate()) for e in edges},
            }
        )
    )


def one_size(millions: float, n_edges: int, root: Path, url: str, password: str) -> None:
    from fedcore.models.wide import hidden_for, parameter_count

    hidden = hidden_for(int(millions * 1e6))
    model_mb = 4 * parameter_count(hidden) / MB
    common = {
        "hidden": hidden,
        "keys": root / "keys.json",
        "url": url,
        "password": password,
        "workdir": root,
    }
    edges = [f"edge-{i + 1}" for i in range(n_edges)]
    floor = child("floor", **common)["rss"]
    asyncio.run(fresh_transport(url, password))
    runs = [child("edge", edge=e, copies=2, **common) for e in edges]
    asyncio.run(fresh_ledger(url, password))
    trainer = child("trainer", updates=n_edges, **common)
    asyncio.run(fresh_ledger(url, password))
    trainer2 = child("trainer", updates=2 * n_edges, **common)  # the second copies too
    rollout = child("rollout", **common)
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("train", "seal", "put")}
    edge_rss = max(r["rss"] for r in runs)

    def rss(mb: float) -> str:
        return f"{mb:5.0f} ({(mb - floor) / model_mb:4.1f}x)"

    def rise(mb: float) -> str:
        return f"+{mb:3.0f} ({mb / model_mb:3.1f}x)"

    print(
        f"{parameter_count(hidden) / 1e6:9.1f} {model_mb:8.0f} | {mean['train']:5.1f} "
        f"{mean['seal']:5.2f} {mean['put'] + trainer['get'] / n_edges:8.2f} "
        f"{trainer['aggregate'] / n_edges:9.2f} {trainer['release']:7.1f} "
        f"{rollout['rollout']:7.1f} | {rss(trainer['ingest_rss'])}  {rss(trainer['rss'])}  "
        f"{rss(trainer2['rss'])} {rss(trainer['gate_rss'])} "
        f"{rise(trainer['gate_rss'] - trainer['pre_gate_rss'])} {rss(trainer['export_rss'])} | "
        f"{rss(edge_rss)}    "
        f"{rollout['rss']:5.0f} | {floor:5.0f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, nargs="+", default=[1.0, 8.0, 25.0])
    p.add_argument("--edges", type=int, default=3)
    p.add_argument("--role", choices=["edge", "trainer", "rollout", "floor"])
    for name in ("hidden", "copies", "updates"):
        p.add_argument(f"--{name}", type=int, default=1)
    for name in ("keys", "url", "password", "workdir", "edge"):
        p.add_argument(f"--{name}")
    a = p.parse_args()
    if a.role == "floor":
        print(json.dumps(floor_role(a)))
        return
    if a.role is not None:
        role = {"edge": edge_role, "trainer": trainer_role, "rollout": rollout_role}[a.role]
        print(json.dumps(asyncio.run(role(a))))
        return
    print(
        f"{a.edges} edges, one round each size; seconds per update; peak RSS in MB, "
        f"(RSS - floor) as a multiple of the FP32 model size; load {os.getloadavg()[0]:.1f}"
    )
    print(
        "                   |             seconds per update     round  edge    |"
        f" trainer peak RSS, MB ({a.edges} updates)    ({2 * a.edges} updates)  "
        "with gate, rise          "
        "export child |"
        " edge peak RSS, MB                 |"
    )
    print(
        "params(M) MB(FP32) | train  seal transfer aggregate release rollout |"
        "  after ingest   after release   after release   (3 updates) (gate alone) "
        "(forked)     |"
        "  train+seal+put   rollout         | floor"
    )
    with tempfile.TemporaryDirectory(prefix="fedgate-large-") as tmp:
        root = Path(tmp)
        edges = [f"edge-{i + 1}" for i in range(a.edges)]
        write_keys(root / "keys.json", [*edges, *(f"{e}-c1" for e in edges)])
        proc, url, password = start_nats(root)
        try:
            for millions in a.params:
                one_size(millions, a.edges, root, url, password)
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
