"""What mapping a version's weights from the verified descriptor costs, next to what the
trainer did before (verify the file by path, then map it by path again).

One signed version directory with a ``weights.npy`` of N FP32 values (default 64M:
256 MiB) and a small ``model.onnx``. Timed (best of 3, the file in the page cache):

- before: ``verify_version_dir`` (hashes every file by path) then ``np.load(mmap_mode="r")``.
- now: ``load_signed_weights`` (the other files by path, ``weights.npy`` hashed from the
  descriptor it then maps).
- map alone: ``np.load(mmap_mode="r")`` with no verification (the floor).

Both verified loads read the weights once; the ratio now/before should be about 1.
Run: ``.venv/bin/python benchmarks/verified_mapping.py [--params N]``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.artifact import sign_version_dir, verify_version_dir
from fedcore.params import load_signed_weights

log = logging.getLogger("benchmarks.verified_mapping")


def best_of(fn: Callable[[], Any], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        vector = fn()
        times.append(time.perf_counter() - start)
        del vector
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=64 << 20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    key = ed25519.Ed25519PrivateKey.generate()
    root = Path(tempfile.mkdtemp(prefix="verified-mapping-"))
    try:
        directory = root / "m" / "2"
        directory.mkdir(parents=True)
        np.save(directory / "weights.npy", np.ones(args.params, "<f4"), allow_pickle=False)
        (directory / "model.onnx").write_bytes(b"\0" * 4096)
        sign_version_dir(directory, key, model="m", version=2)
        trusted = key.public_key()

        def before() -> Any:
            verify_version_dir(directory, trusted, model="m", version=2, check_onnx=False)
            return np.load(directory / "weights.npy", mmap_mode="r", allow_pickle=False)

        def now() -> Any:
            return load_signed_weights(directory, trusted, model="m", version=2, check_onnx=False)

        def floor() -> Any:
            return np.load(directory / "weights.npy", mmap_mode="r", allow_pickle=False)

        t_before, t_now, t_floor = best_of(before), best_of(now), best_of(floor)
        mib = args.params * 4 / (1 << 20)
        log.info("weights: %.0f MiB", mib)
        log.info("before (verify by path, map by path): %.3f s", t_before)
        log.info("now (hash and map one descriptor):   %.3f s", t_now)
        log.info("map alone (no verification):          %.4f s", t_floor)
        log.info("ratio now / before: %.2f", t_now / t_before)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
