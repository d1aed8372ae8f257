"""Shamir t-of-n secret sharing over the prime field GF(2**521 - 1).

The secrets are 32-byte values (self-mask seeds and X25519 private keys), read as
big-endian integers below 2**256, so every secret is a field element. 2**521 - 1 is a
Mersenne prime; a share is its x-coordinate (the holder's 1-based index in the round)
and a 66-byte big-endian y value. Coefficients come from :mod:`secrets`.

This is field arithmetic, not a cipher: shares travel encrypted (AES-GCM) to their holders.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedcore.errors import SecAggError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of a sharing polynomial."""

    x: int
    y: int

    def y_bytes(self) -> bytes:
        """``y`` as 66 big-endian bytes."""
        return self.y.to_bytes(SHARE_BYTES, "big")


def evaluate(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """The polynomial ``coefficients[0] + coefficients[1]*x + ...`` at ``x``, mod ``prime``."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % prime
    return acc


def lagrange_at_zero(points: Sequence[Share], prime: int = PRIME) -> int:
    """Interpolate the polynomial through ``points`` and evaluate it at 0, mod ``prime``."""
    xs = [p.x for p in points]
    if len(set(xs)) != len(xs):
        raise SecAggError("malformed", f"duplicate share x-coordinates {sorted(xs)}")
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * pj.x % prime
                den = den * (pj.x - pi.x) % prime
        total = (total + pi.y * num * pow(den, -1, prime)) % prime
    return total


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[Share]:
    """Share a 32-byte ``secret`` among holders at ``xs`` so that ``threshold`` recover it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError("malformed", f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise SecAggError("malformed", f"threshold {threshold} out of range for {len(xs)} holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("malformed", "share x-coordinates must be distinct and non-zero")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, evaluate(coefficients, x)) for x in xs]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """Recover a 32-byte secret from at least ``threshold`` shares (the first ones are used).

    With fewer than ``threshold`` shares this refuses; a wrong share yields a wrong secret,
    which callers detect against a commitment (the advertised public key or seed digest).
    """
    if len(shares) < threshold:
        raise SecAggError(
            "below-threshold", f"{len(shares)} shares, {threshold} needed to reconstruct"
        )
    value = lagrange_at_zero(shares[:threshold])
    if value >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("reconstruction-mismatch", "reconstructed value is not a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def share_from_bytes(x: int, y: bytes) -> Share:
    """Parse a share's 66-byte y value, refusing values outside the field."""
    if len(y) != SHARE_BYTES:
        raise SecAggError("malformed", f"a share is {SHARE_BYTES} bytes, got {len(y)}")
    value = int.from_bytes(y, "big")
    if value >= PRIME:
        raise SecAggError("malformed", "share value outside the field")
    return Share(x, value)
