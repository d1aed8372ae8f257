"""API keys with roles, stored hashed; a per-key token-bucket rate limit.

Clients send ``Authorization: Bearer <key>``. The gateway keeps only SHA-256 digests of
the keys (keys are high-entropy random tokens, so a fast hash is the right one), finds the
key by its digest and confirms with a constant-time comparison.

A key file holds one key per line, ``<role>:<name>:<sha256-hex>[:<requests-per-second>]``;
blank lines and ``#`` comments are ignored. Roles, each allowing what the one before it
does: ``metrics`` (``GET /metrics`` only: a scraper's key, which can run no inference),
``infer`` (inference, metadata, fleet reads) and ``admin`` (everything, including routes
that change the gateway's state).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedcore.errors import ConfigError
from gateway.errors import Forbidden, RateLimited, Unauthorized

Role = Literal["metrics", "infer", "admin"]
ROLES: tuple[Role, ...] = ("metrics", "infer", "admin")
"""From least to most: a role allows what every role before it allows."""
KEY_PREFIX = "fgk_"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the key's name, its role, its own rate (None: default)."""

    name: str
    role: Role
    rate_per_s: float | None = None
    digest: bytes = field(default=b"", repr=False)

    def allows(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


DEV_PRINCIPAL = Principal("dev-mode", "admin")


def generate_key() -> str:
    """A new random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 digest stored for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_line(role: Role, name: str, key: str, rate_per_s: float | None = None) -> str:
    """One key-file line for ``key`` (the key itself is not in it)."""
    line = f"{role}:{name}:{hash_key(key)}"
    return line if rate_per_s is None else f"{line}:{rate_per_s:g}"


def _parse_line(line: str, where: str) -> tuple[bytes, Principal]:
    parts = line.split(":")
    if len(parts) not in (3, 4):
        raise ConfigError(f"{where}: expected <role>:<name>:<sha256-hex>[:<rate>]")
    role, name, digest = parts[0], parts[1], parts[2].lower()
    if role not in ROLES:
        raise ConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if not _NAME.match(name):
        raise ConfigError(f"{where}: key name {name!r} must match {_NAME.pattern}")
    if not _HEX.match(digest):
        raise ConfigError(f"{where}: key hash must be 64 hex digits (SHA-256 of the key)")
    rate: float | None = None
    if len(parts) == 4:
        try:
            rate = float(parts[3])
        except ValueError:
            rate = -1.0
        if not rate > 0 or math.isinf(rate):
            raise ConfigError(f"{where}: rate {parts[3]!r} must be a positive number")
    raw = bytes.fromhex(digest)
    return raw, Principal(name, role, rate, raw)


@dataclass
class KeyRing:
    """The known keys by digest. ``dev_mode`` lets every request in as :data:`DEV_PRINCIPAL`."""

    keys: dict[bytes, Principal] = field(default_factory=dict)
    dev_mode: bool = False

    @classmethod
    def parse(cls, text: str, source: str) -> KeyRing:
        """Parse key lines (newline- or comma-separated); errors name the source and line."""
        ring = cls()
        names: set[str] = set()
        for number, raw in enumerate(re.split(r"[\n,]", text), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            digest, principal = _parse_line(line, f"{source} entry {number}")
            if digest in ring.keys or principal.name in names:
                raise ConfigError(f"{source} entry {number}: duplicate key or name")
            names.add(principal.name)
            ring.keys[digest] = principal
        return ring

    @classmethod
    def load(cls, path: Path | None, inline: str | None, dev_mode: bool) -> KeyRing:
        """Keys from a file and/or inline entries; refuses to run with none unless dev mode."""
        ring = cls(dev_mode=dev_mode)
        sources: list[tuple[str, str]] = []
        if path is not None:
            try:
                sources.append((path.read_text(), str(path)))
            except OSError as exc:
                raise ConfigError(f"cannot read the API keys file {path}: {exc}") from None
        if inline:
            sources.append((inline, "FEDGATE_GATEWAY_API_KEYS"))
        for text, source in sources:
            for digest, principal in cls.parse(text, source).keys.items():
                if digest in ring.keys:
                    raise ConfigError(f"{source}: key {principal.name!r} is listed twice")
                ring.keys[digest] = principal
        if not ring.keys and not dev_mode:
            raise ConfigError(
                "no API keys configured: set FEDGATE_GATEWAY_API_KEYS_FILE (or _API_KEYS), "
                "or FEDGATE_GATEWAY_DEV_MODE=true to run without keys"
            )
        return ring

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal for an ``Authorization`` header value, or raise 401."""
        if self.dev_mode:
            return DEV_PRINCIPAL
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(token.strip()).digest()
        # The lookup compares digests, never the key: its timing reveals nothing an attacker
        # could use without a SHA-256 preimage. The stored digest is then confirmed in
        # constant time, so no comparison of secret material depends on where it differs.
        principal = self.keys.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            raise Unauthorized("unknown API key")
        return principal


def require(principal: Principal, role: Role) -> Principal:
    """``principal`` if its role allows ``role``, else 403."""
    if not principal.allows(role):
        raise Forbidden(f"API key '{principal.name}' has role '{principal.role}'; needs '{role}'")
    return principal


@dataclass
class RateLimiter:
    """Token buckets per key name: ``rate`` requests per second, bursts of ``burst_s`` worth.

    A rate of 0 (the default for a key without its own) disables the limit.
    """

    default_rate: float
    burst_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, list[float]] = field(default_factory=dict)

    def check(self, principal: Principal) -> None:
        """Take one token for ``principal`` or raise 429 with ``Retry-After``."""
        rate = principal.rate_per_s or self.default_rate
        if rate <= 0:
            return
        now = self.clock()
        capacity = max(1.0, rate * self.burst_s)
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            bucket = self._buckets[principal.name] = [capacity, now]
        tokens = min(capacity, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return
        bucket[0] = tokens
        wait = max(1, math.ceil((1.0 - tokens) / rate))
        raise RateLimited(
            f"rate limit of {rate:g} requests/s exceeded for API key '{principal.name}'", wait
        )
