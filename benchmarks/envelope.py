"""Sealed update envelope: throughput against raw AES-256-GCM, KEM cost, bytes on the wire.

All figures come from one run on the same data. Timings are the best of several
interleaved repetitions (raw, seal, open take turns), so background load hits all alike.

1. Throughput (MB/s, 1 MB = 10^6 bytes) of ``seal_update``/``open_update`` (X25519 suite,
   1 MiB chunks) next to raw AES-256-GCM on the same payload: one ``AESGCM.encrypt``/
   ``decrypt`` call over the whole payload (allocating its output, as seal and open must),
   and one ``encrypt_into`` into a reused buffer (no allocation: an upper bound). SHA-256
   of the payload is shown too: the signature covers the SHA-256 of the ciphertext, so
   seal and open each hash every byte once besides encrypting it; the digest runs in a
   second thread beside AES-GCM, which needs a second free core (the load average is
   printed with the figures).
2. Fixed cost per update (microseconds, median) of X25519 against ML-KEM-768+X25519:
   seal and open of an empty payload and of a digits-model-sized one, and envelope bytes.
3. Bytes on the wire per compression mode against raw float32, for the digits model
   (layout of ``fedcore.models.digits``) and a 4M-parameter layout: encoded payload,
   sealed envelope, ratio, relative L2 error of one round.

Run: ``.venv/bin/python benchmarks/envelope.py`` (about 30 s on 2 cores);
``--kem`` runs part 2 alone (a few seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcore.compression import MODES, CompressionSettings, decode_update, encode_update
from fedcore.envelope import (
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    RecipientPrivateKey,
    generate_recipient_key,
    open_update,
    seal_update,
)

MIB = 1024 * 1024
EDGE = ed25519.Ed25519PrivateKey.generate()
KEYS = {"edge-1": EDGE.public_key()}
BASE = hashlib.sha256(b"base").hexdigest()
HPKE = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
DIGITS_SIZES = [64 * 64, 64, 64 * 10, 10]  # Linear(64, 64), Linear(64, 10)
LARGE_SIZES = [1024 * 1024, 1024, 1024 * 1024, 1024, 2 * 1024 * 1024, 1024]


def seal(payload: bytes, key: RecipientPrivateKey, compression: str = "none") -> bytearray:
    return seal_update(
        payload,
        recipient=key.public_key(),
        signer=EDGE,
        model="digits",
        round=1,
        edge_id="edge-1",
        base_version=1,
        base_digest=BASE,
        compression=compression,
    )[1]


def open_(data: bytes, key: RecipientPrivateKey) -> bytearray:
    return open_update(data, recipient=key, edge_keys=KEYS.get, max_payload=1 << 30)[1]


def best_of(ops: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best wall time of each op over ``reps`` interleaved rounds."""
    best = dict.fromkeys(ops, float("inf"))
    for _ in range(reps):
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def throughput() -> None:
    print(
        "1. Throughput, X25519 suite, 1 MiB chunks (MB/s; ratio = envelope / raw encrypt|decrypt)"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cores = len(os.sched_getaffinity(0))
    print(f"   {cores} cores, load average {load}, {platform.processor() or platform.machine()}")
    print(
        f"{'payload':>8} {'raw enc':>8} {'raw dec':>8} {'enc_into':>8} {'sha256':>8} "
        f"{'seal':>8} {'open':>8} {'seal/raw':>8} {'open/raw':>8}"
    )
    key = generate_recipient_key(SUITE_X25519)
    for size, reps in ((1 * MIB, 40), (4 * MIB, 24), (16 * MIB, 12), (64 * MIB, 6)):
        throughput_row(size, reps, key)
    print()


def throughput_row(size: int, reps: int, key: RecipientPrivateKey) -> None:
    payload = os.urandom(size)
    aead, nonce = AESGCM(AESGCM.generate_key(bit_length=256)), os.urandom(12)
    ciphertext = aead.encrypt(nonce, payload, None)
    reused = bytearray(size + 16)
    envelope = bytes(seal(payload, key))
    assert open_(envelope, key) == payload
    t = best_of(
        {
            "raw enc": lambda: aead.encrypt(nonce, payload, None),
            "raw dec": lambda: aead.decrypt(nonce, ciphertext, None),
            "enc_into": lambda: aead.encrypt_into(nonce, payload, None, reused),
            "sha256": lambda: hashlib.sha256(payload).digest(),
            "seal": lambda: seal(payload, key),
            "open": lambda: open_(envelope, key),
        },
        reps,
    )
    rate = {name: size / secs / 1e6 for name, secs in t.items()}
    print(
        f"{size // MIB:>5}MiB "
        + " ".join(f"{rate[n]:>8.0f}" for n in ("raw enc", "raw dec", "enc_into", "sha256"))
        + f" {rate['seal']:>8.0f} {rate['open']:>8.0f}"
        + f" {t['raw enc'] / t['seal']:>7.2f}x {t['raw dec'] / t['open']:>7.2f}x"
    )
    # Seal and open each encrypt (or decrypt) and hash every byte. On one core the best a
    # design that signs a hash of the ciphertext can do is raw / (raw + hash); with the
    # digest thread on a second core, raw / max(raw, hash); with both cores sharing the
    # hashing once the cipher is done (a tree hash), 2 raw / (raw + max(raw, hash)).
    raw, sha = t["raw enc"], t["sha256"]
    print(
        f"{'':>8} ceilings: one core {raw / (raw + sha):.2f}x, digest thread "
        f"{raw / max(raw, sha):.2f}x, two cores sharing the hash "
        f"{2 * raw / (raw + max(raw, sha)):.2f}x"
    )


def medians_us(ops: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time of each op in microseconds over ``reps`` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def kem_cost() -> None:
    print("2. Cost per update by HPKE suite (median microseconds, suites interleaved)")
    print(f"{'suite':<38} {'payload':>8} {'seal us':>9} {'open us':>9} {'envelope B':>11}")
    payloads = {"kem only": b"k" * 32, "0": b"", "19240": os.urandom(4 * sum(DIGITS_SIZES))}
    ops: dict[str, Callable[[], object]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for suite in (SUITE_X25519, SUITE_MLKEM768_X25519):
        key = generate_recipient_key(suite)
        for label, payload in payloads.items():
            if label == "kem only":
                wrapped = HPKE[suite].encrypt(payload, key.public_key(), info=b"i")
                ops[f"{suite}|{label}|seal"] = kem_seal(suite, key, payload)
                ops[f"{suite}|{label}|open"] = kem_open(suite, key, wrapped)
                sizes[suite, label] = len(wrapped)
                continue
            envelope = bytes(seal(payload, key))
            ops[f"{suite}|{label}|seal"] = partial(seal, payload, key)
            ops[f"{suite}|{label}|open"] = partial(open_, envelope, key)
            sizes[suite, label] = len(envelope)
    us = medians_us(ops, 400)
    for (suite, label), size in sizes.items():
        shown = label if label == "kem only" else f"{label}B"
        print(
            f"{suite:<38} {shown:>8} {us[f'{suite}|{label}|seal']:>9.0f} "
            f"{us[f'{suite}|{label}|open']:>9.0f} {size:>11}"
        )
    print("(kem only: HPKE single-shot seal/open of a 32-byte key, no signature, no chunks)")
    print()


def kem_seal(suite: str, key: RecipientPrivateKey, data: bytes) -> Callable[[], object]:
    return partial(HPKE[suite].encrypt, data, key.public_key(), info=b"i")


def kem_open(suite: str, key: RecipientPrivateKey, wrapped: bytes) -> Callable[[], object]:
    return partial(HPKE[suite].decrypt, wrapped, key, info=b"i")


def wire_bytes() -> None:
    print("3. Bytes on the wire per compression mode (one round, delta ~ N(0, 0.01^2))")
    print(
        f"{'layout':<10} {'mode':<6} {'payload B':>10} {'envelope B':>11} {'/float32':>9} "
        f"{'rel L2 err':>10} {'enc ms':>7} {'dec ms':>7}"
    )
    key = generate_recipient_key(SUITE_X25519)
    rng = np.random.default_rng(0)
    for name, sizes in (("digits", DIGITS_SIZES), ("4M params", LARGE_SIZES)):
        delta = (rng.standard_normal(sum(sizes)) * 0.01).astype(np.float32)
        raw = 4 * delta.size
        for mode in MODES:
            settings = CompressionSettings(mode=mode, topk_fraction=0.01)
            start = time.perf_counter()
            encoded = encode_update(delta, sizes, settings)
            enc_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            out = decode_update(encoded.data, mode, sizes)
            dec_ms = (time.perf_counter() - start) * 1e3
            err = float(np.linalg.norm(out - delta) / np.linalg.norm(delta))
            envelope = len(seal(encoded.data, key, compression=mode))
            print(
                f"{name:<10} {mode:<6} {encoded.encoded_bytes:>10} {envelope:>11} "
                f"{envelope / raw:>8.3f}x {err:>10.4f} {enc_ms:>7.1f} {dec_ms:>7.1f}"
            )
        print(f"{name:<10} {'raw':<6} {raw:>10} {'':>11} {'1.000x':>9}")
    topk = "topk keeps ceil(1% of values) as uint32 index + float32 value"
    print(f"({topk}; int8 adds one float32 scale per tensor.)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kem", action="store_true", help="only part 2: cost per update by KEM")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.kem:
        throughput()
    kem_cost()
    if not args.kem:
        wire_bytes()
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
