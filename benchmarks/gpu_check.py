"""One edge on this machine's accelerator: inference latency and a training step time.

Starts one edge's tritonserver serving ``digits`` (signed version 1) with the instance
kind the edge would choose (``KIND_GPU`` when a CUDA device and ONNX Runtime's CUDA
provider are present, ``KIND_CPU`` otherwise; ``--kind`` overrides), sends sequential
single-row requests and prints p50/p99 latency and the ONNX Runtime providers the model
got; then times fine-tuning steps on the device the edge's worker would pick
(``edge_runtime.finetune.select_device``: CUDA when torch sees one, CPU otherwise) for a
batch of 32 (the default recipe) and of 1024. Runs on CPU-only machines too.

    .venv/bin/python benchmarks/gpu_check.py [--requests 500] [--steps 200] [--kind auto]
"""

from __future__ import annotations

import argparse
import http.client
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from idle_training import body, build_version, start_triton  # type: ignore[import-not-found]


def inference(port: int, requests: int) -> list[float]:
    from fedcore.models import get_spec

    _, _, x, _ = get_spec("digits").dataset()
    bodies = [body(row, None) for row in x[:64]]
    conn = http.client.HTTPConnection("127.0.0.1", port)
    latencies = []
    for i in range(requests + 20):
        t0 = time.perf_counter()
        conn.request("POST", "/v2/models/digits/infer", bodies[i % len(bodies)])
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"inference failed: {resp.status}")
        if i >= 20:  # warm-up excluded
            latencies.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return latencies


def training_step_ms(artifacts: Path, batch: int, steps: int) -> tuple[str, float]:
    """Mean time of one SGD step (forward, backward, update) on the edge's training device."""
    import torch

    from edge_runtime.finetune import select_device
    from fedcore.models import get_spec
    from fedcore.params import load_flat, load_weights_file

    torch.set_num_threads(1)  # as the edge's worker runs (train_threads)
    device = select_device("auto")
    spec = get_spec("digits")
    module = spec.build_module()
    load_flat(module, load_weights_file(artifacts / "digits" / "1" / "weights.npy"))
    module.to(device).train()
    x_train, y_train, _, _ = spec.dataset()
    idx = np.arange(batch) % len(y_train)
    x = torch.from_numpy(x_train[idx]).to(device)
    y = torch.from_numpy(y_train[idx]).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    for _ in range(20):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{device} ({name})", (time.perf_counter() - t0) / steps * 1000


def providers(log: Path) -> str:
    found = re.findall(r"ONNX Runtime providers (\[[^\]]*\])", log.read_text(errors="replace"))
    return found[-1] if found else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kind", choices=["auto", "KIND_CPU", "KIND_GPU"], default="auto")
    args = parser.parse_args()
    from edge_runtime.repository import detect_kind

    kind = detect_kind() if args.kind == "auto" else args.kind
    with tempfile.TemporaryDirectory(prefix="fedgate-gpu-check-") as tmp:
        root = Path(tmp)
        artifacts, public = build_version(root)
        server = start_triton(root, artifacts, public, kind)
        try:
            latencies = inference(server.http_port, args.requests)
            used = providers(root / "triton" / "tritonserver.log")
        finally:
            server.stop()
        device, step32 = training_step_ms(artifacts, 32, args.steps)
        _, step1024 = training_step_ms(artifacts, 1024, args.steps)
    lat = np.asarray(latencies)
    print(f"inference: tritonserver {kind}, ONNX Runtime providers {used}")
    print(f"  {len(lat)} sequential single-row JSON requests: p50 {np.percentile(lat, 50):.3f} ms, "
          f"p99 {np.percentile(lat, 99):.3f} ms")  # fmt: skip
    print(f"training: device {device}")
    print(
        f"  one SGD step of the digits MLP: batch 32 {step32:.3f} ms, batch 1024 {step1024:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
