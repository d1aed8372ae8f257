"""Shamir t-of-n secret sharing over the prime field GF(2**521 - 1).

The secrets are 32-byte values (self-mask seeds and X25519 private keys), read as
big-endian integers below 2**256, so every secret is a field element. 2**521 - 1 is a
Mersenne prime; a share is its x-coordinate (the holder's 1-based index in the round)
and a 66-byte big-endian y value. Coefficients come from :mod:`secrets`.

This is field arithmetic, not a cipher: shares travel encrypted (AES-GCM) to their holders.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from fedcore.errors import SecAggError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32
MAX_SUBSETS = 20_000
"""The most share subsets :func:`recover` interpolates before it gives up."""


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


def lagrange_at(points: Sequence[Share], x: int, prime: int = PRIME) -> int:
    """Interpolate the polynomial through ``points`` and evaluate it at ``x``, mod ``prime``."""
    xs = [p.x for p in points]
    if len(set(xs)) != len(xs):
        raise SecAggError("malformed", f"duplicate share x-coordinates {sorted(xs)}")
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (x - pj.x) % prime
                den = den * (pi.x - pj.x) % prime
        total = (total + pi.y * num * pow(den, -1, prime)) % prime
    return total


def lagrange_at_zero(points: Sequence[Share], prime: int = PRIME) -> int:
    """Interpolate the polynomial through ``points`` and evaluate it at 0, mod ``prime``."""
    return lagrange_at(points, 0, prime)


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


def _candidates(count: int, threshold: int) -> Iterator[tuple[int, ...]]:
    """Index sets of ``threshold`` shares out of ``count``, fewest suspects first: leaving
    out ``e`` shares among the first ``threshold + e`` (every honest subset is reached once
    ``e`` is the number of bad shares)."""
    seen: set[tuple[int, ...]] = set()
    for e in range(count - threshold + 1):
        head = range(threshold + e)
        for out in itertools.combinations(head, e):
            picked = tuple(i for i in head if i not in out)
            if picked not in seen:
                seen.add(picked)
                yield picked


def recover(
    shares: Sequence[Share], threshold: int, check: Callable[[bytes], bool]
) -> tuple[bytes, tuple[int, ...]]:
    """The 32-byte secret that ``check`` accepts (its commitment), from ``threshold``
    consistent shares among ``shares``, and the x-coordinates of the shares that do not lie
    on its polynomial (wrong shares: their holders lied or were lied to). When the first
    ``threshold`` shares already give the secret, the others are not examined (a wrong
    share nobody used is not looked for).

    Tries subsets with the fewest left-out shares first, so one wrong share costs at most
    ``threshold + 1`` interpolations. ``below-threshold`` with fewer than ``threshold``
    shares; ``reconstruction-mismatch`` when no subset (of the first :data:`MAX_SUBSETS`)
    gives a secret ``check`` accepts: fewer than ``threshold`` shares are right.
    """
    if len(shares) < threshold:
        raise SecAggError(
            "below-threshold", f"{len(shares)} shares, {threshold} needed to reconstruct"
        )
    for tried, picked in enumerate(_candidates(len(shares), threshold)):
        if tried >= MAX_SUBSETS:
            break
        points = [shares[i] for i in picked]
        value = lagrange_at_zero(points)
        if value >= 1 << (8 * SECRET_BYTES):
            continue
        secret = value.to_bytes(SECRET_BYTES, "big")
        if check(secret):
            if tried == 0:  # the usual case: nothing to look for (and O(m t^2) saved)
                return secret, ()
            wrong = tuple(s.x for s in shares if lagrange_at(points, s.x) != s.y)
            return secret, wrong
    raise SecAggError(
        "reconstruction-mismatch",
        f"no {threshold} of the {len(shares)} shares give the committed secret",
    )
