"""Ingest throughput of streaming aggregation, next to reading the bytes once and next to
a list-based FedAvg that holds every update (Flower's ``aggregate`` style).

50 updates of 1M FP32 parameters arrive as little-endian bytes. Timed (best of 3):

- read once: ``np.frombuffer(...).sum()`` over every update's bytes; the floor for
  anything that must look at all the data.
- decode + validate: ``np.frombuffer(b, "<f4")`` (zero-copy) and ``update_norm`` (one pass: the
  L2 norm, which also rejects NaN/Inf).
- decode + validate + accumulate: ``FedAvg.fold`` into a ``WeightedSum``; the
  accumulate step is the difference of the two.
- list-based FedAvg: decode each update to a copy (as ``np.load`` does in Flower's
  ``parameters_to_ndarrays``), keep them all, weighted mean by ``reduce(np.add)``.
- verify + decrypt + decode + accumulate, when ``fedcore.envelope`` is present: each
  update sealed (HPKE X25519 + AES-256-GCM chunks + Ed25519), then opened and folded.

Peak memory (tracemalloc, on top of the input bytes) is reported for 10 and 50 updates.
Target: accumulate within 3x read-once; streaming peak independent of the count.
Run: ``.venv/bin/python benchmarks/aggregation.py [--params N] [--updates N]``.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from functools import partial, reduce
from typing import Any

import numpy as np
import numpy.typing as npt

from trainer.aggregate import update_norm
from trainer.strategies.fedavg import FedAvg

MiB = 1024 * 1024


def make_updates(n: int, dim: int, seed: int = 0) -> tuple[list[bytes], list[float]]:
    rng = np.random.default_rng(seed)
    blobs = [
        (rng.standard_normal(dim, dtype=np.float32) * np.float32(0.01)).astype("<f4").tobytes()
        for _ in range(n)
    ]
    weights = [float(w) for w in rng.integers(50, 500, size=n)]
    return blobs, weights


def read_once(blobs: list[bytes], weights: list[float], dim: int) -> object:
    return sum(float(np.frombuffer(b, dtype="<f4").sum()) for b in blobs)


def decode_validate(blobs: list[bytes], weights: list[float], dim: int) -> object:
    return [update_norm(np.frombuffer(b, dtype="<f4"), dim) for b in blobs]


def streaming(blobs: list[bytes], weights: list[float], dim: int) -> npt.NDArray[Any]:
    strategy = FedAvg()
    state = strategy.start(dim)
    for b, w in zip(blobs, weights, strict=True):
        strategy.fold(state, np.frombuffer(b, dtype="<f4"), w)
    return strategy.finalize(state, np.zeros(dim, dtype=np.float32))


def streaming_phases(
    blobs: list[bytes], weights: list[float], dim: int
) -> tuple[float, float, float]:
    """Milliseconds of ``start`` (allocate and touch 16 bytes/param), the folds, ``finalize``."""
    strategy = FedAvg()
    t0 = time.perf_counter()
    state = strategy.start(dim)
    t1 = time.perf_counter()
    for b, w in zip(blobs, weights, strict=True):
        strategy.fold(state, np.frombuffer(b, dtype="<f4"), w)
    t2 = time.perf_counter()
    strategy.finalize(state, np.zeros(dim, dtype=np.float32))
    t3 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


def list_fedavg(blobs: list[bytes], weights: list[float], dim: int) -> npt.NDArray[Any]:
    """Flower's ``aggregate``: keep every update, weight each, reduce, divide."""
    updates = [np.frombuffer(b, dtype="<f4").copy() for b in blobs]
    total = sum(weights)
    weighted = [u * w for u, w in zip(updates, weights, strict=True)]
    return reduce(np.add, weighted) / total


def best_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def peak_mib(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / MiB


def envelope_rows(blobs: list[bytes], weights: list[float], dim: int) -> None:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from fedcore.envelope import generate_recipient_key, open_update, seal_update
    except ImportError as exc:
        print(f"verify+decrypt+decode+accumulate: skipped (fedcore.envelope missing: {exc})")
        return
    recipient = generate_recipient_key()
    signer = ed25519.Ed25519PrivateKey.generate()
    sealed = [
        seal_update(
            b,
            recipient=recipient.public_key(),
            signer=signer,
            model="digits",
            round=1,
            edge_id=f"edge-{i}",
            base_version=1,
            base_digest="0" * 64,
            num_samples=int(w),
        )[1]
        for i, (b, w) in enumerate(zip(blobs, weights, strict=True))
    ]
    public = signer.public_key()

    def ingest() -> npt.NDArray[Any]:
        strategy = FedAvg()
        state = strategy.start(dim)
        for env in sealed:
            header, payload = open_update(
                env, recipient=recipient, edge_keys=lambda _e: public, max_payload=8 * dim
            )
            strategy.fold(state, np.frombuffer(payload, dtype="<f4"), float(header.num_samples))
        return strategy.finalize(state, np.zeros(dim, dtype=np.float32))

    ms = best_ms(ingest)
    n = len(blobs)
    print(
        f"verify+decrypt+decode+validate+accumulate: {ms:8.1f} ms  "
        f"({n * dim * 4 / MiB / ms * 1e3:7.0f} MiB/s, {ms / n:.2f} ms/update)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=50)
    args = parser.parse_args()
    dim, n = args.params, args.updates
    blobs, weights = make_updates(n, dim)
    mib = n * dim * 4 / MiB
    print(f"{n} updates x {dim:,} float32 params ({mib:.0f} MiB of update bytes)\n")

    phases = [streaming_phases(blobs, weights, dim) for _ in range(3)]
    start_ms, folds_ms, final_ms = (min(p[i] for p in phases) for i in range(3))
    rows = {
        "read once (np.frombuffer + sum)": best_ms(lambda: read_once(blobs, weights, dim)),
        "decode + validate (norm, finite)": best_ms(lambda: decode_validate(blobs, weights, dim)),
        f"decode + validate + accumulate x{n}": folds_ms,
        "streaming round (start+folds+final)": best_ms(lambda: streaming(blobs, weights, dim)),
        "list-based FedAvg (Flower-style)": best_ms(lambda: list_fedavg(blobs, weights, dim)),
    }
    base = rows["read once (np.frombuffer + sum)"]
    for label, ms in rows.items():
        print(f"{label:<36} {ms:7.1f} ms {mib / ms * 1e3:7.0f} MiB/s {ms / base:6.2f}x read-once")
    accumulate = folds_ms - rows["decode + validate (norm, finite)"]
    print(
        f"{'accumulate step (by difference)':<36} {accumulate:7.1f} ms {'':13} "
        f"{accumulate / base:6.2f}x read-once (target <= 3x)"
    )
    print(
        f"fixed per round: start {start_ms:.1f} ms (allocate + touch {16 * dim / MiB:.0f} MiB),"
        f" finalize {final_ms:.1f} ms"
    )
    same = np.allclose(
        streaming(blobs, weights, dim), list_fedavg(blobs, weights, dim), rtol=1e-5, atol=1e-7
    )
    print(f"streaming result equals list-based result: {same}\n")

    print("peak memory above the input bytes (tracemalloc):")
    for count in (10, n):
        b, w = blobs[:count], weights[:count]
        s_peak = peak_mib(partial(streaming, b, w, dim))
        l_peak = peak_mib(partial(list_fedavg, b, w, dim))
        print(f"  {count:3d} updates: streaming {s_peak:7.1f} MiB   list-based {l_peak:7.1f} MiB")
    print()
    envelope_rows(blobs, weights, dim)


if __name__ == "__main__":
    main()
