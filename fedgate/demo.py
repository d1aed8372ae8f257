"""``fedgate demo``: start the stack, classify held-out digits through the gateway, stop.

Uses the official ``tritonclient.http`` client against the gateway URL, exactly as a user
would point it at Triton. Exit 0 only if every answer came back and matches torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcore.models import get_spec
from fedgate.launcher import Stack, StackConfig


def _torch_argmax(stack: Stack, x: NDArray[Any]) -> NDArray[Any]:
    import torch

    from fedcore.params import load_flat

    spec = get_spec("digits")
    module = spec.build_module()
    params = np.load(
        stack.config.data_dir / "trainer" / "state" / "digits-1.npy", allow_pickle=False
    )
    load_flat(module, params)
    with torch.no_grad():
        out: NDArray[Any] = module.eval()(torch.from_numpy(x)).numpy().argmax(axis=1)
    return out


def classify_through_gateway(
    url: str, x: NDArray[Any], batch: int = 16, api_key: str | None = None
) -> tuple[NDArray[Any], list[str]]:
    """Logits argmax for ``x`` via the gateway, and which edge served each batch."""
    import tritonclient.http as httpclient

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    preds, edges = [], []
    try:
        for start in range(0, len(x), batch):
            chunk = np.ascontiguousarray(x[start : start + batch])
            inp = httpclient.InferInput("pixels", list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk, binary_data=start % (2 * batch) == 0)
            result = client.infer("digits", [inp], headers=headers)
            preds.append(result.as_numpy("logits").argmax(axis=1))
            edges.append(result.get_response().get("model_name", ""))
    finally:
        client.close()
    return np.concatenate(preds), edges


def run_demo(config: StackConfig, out: Callable[[str], None]) -> int:
    """Start, infer, compare, stop. Returns the exit code."""
    stack = Stack(config)
    try:
        out(f"starting fedgate with {config.edges} edge(s) under {config.data_dir}")
        t0 = time.monotonic()
        stack.start()
        out(f"stack ready in {time.monotonic() - t0:.1f}s; gateway at {stack.gateway_url}")
        _, _, x_test, y_test = get_spec("digits").dataset()
        t1 = time.monotonic()
        preds, _ = classify_through_gateway(stack.gateway_url, x_test, api_key=stack.api_key())
        elapsed = time.monotonic() - t1
        reference = _torch_argmax(stack, x_test)
        agree = float(np.mean(preds == reference))
        accuracy = float(np.mean(preds == y_test))
        out(f"classified {len(x_test)} held-out digits through the gateway in {elapsed:.2f}s")
        out(f"version 1 accuracy: {accuracy:.3f}; agreement with torch: {agree:.3f}")
        ok = agree == 1.0
        out("demo passed" if ok else "demo FAILED: gateway answers differ from torch")
        return 0 if ok else 1
    finally:
        stack.stop()
        out("stack stopped")
