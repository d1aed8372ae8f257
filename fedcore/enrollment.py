"""The edge registry: which edge identities (Ed25519 public keys) the trainer accepts.

One JSON file, written by ``fedgate keys enroll|revoke`` and read by the trainer (which
mirrors it into the NATS KV bucket ``fedgate_edges`` for the rest of the fleet)::

    {"edge-1": {"public_key": "<64 hex>", "revoked": false,
                "enrolled_at": "2026-01-01T00:00:00Z", "revoked_at": null}, ...}

Parsing is strict: unknown or missing fields, a key that is not an Ed25519 public key,
an edge id that is not one, or a public key enrolled twice are refused. A revoked edge
stays in the file (so its key can never be enrolled again) and its updates are refused
with their own reason. Writes go to a temporary file then ``rename``: a reader never
sees half a registry.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.edge_id import EDGE_ID_PATTERN, is_edge_id
from fedcore.errors import EnrollmentError
from fedcore.files import write_atomic
from fedcore.strict_json import loads_strict

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_FIELDS = {"public_key", "revoked", "enrolled_at", "revoked_at"}
MAX_REGISTRY_BYTES = 16 * 1024 * 1024


class EdgeStatus(Enum):
    """What the registry says about an edge id."""

    ACTIVE = "active"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


def utc_now() -> str:
    """The current time as the registry writes it (ISO 8601, seconds, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class EdgeRecord:
    """One enrolled edge: its hex Ed25519 public key and whether it is revoked."""

    public_key: str
    enrolled_at: str
    revoked: bool = False
    revoked_at: str | None = None

    def __post_init__(self) -> None:
        if type(self.public_key) is not str or not _HEX64.fullmatch(self.public_key):
            raise _malformed(f"public_key {self.public_key!r} is not 64 lowercase hex characters")
        if type(self.revoked) is not bool:
            raise _malformed(f"revoked {self.revoked!r} is not true or false")
        for name in ("enrolled_at", "revoked_at"):
            value = getattr(self, name)
            if value is None and name == "revoked_at":
                continue
            if type(value) is not str or not _TIMESTAMP.fullmatch(value):
                raise _malformed(f"{name} {value!r} is not YYYY-MM-DDTHH:MM:SSZ")
        if self.revoked != (self.revoked_at is not None):
            raise _malformed("revoked_at must be set exactly when revoked is true")

    def to_json(self) -> dict[str, Any]:
        """The record as the registry file holds it."""
        return {
            "public_key": self.public_key,
            "revoked": self.revoked,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
        }

    def encode(self) -> bytes:
        """Compact JSON with sorted keys (the value mirrored into NATS KV)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


class EdgeRegistry(Mapping[str, EdgeRecord]):
    """An immutable registry of edges; ``enroll`` and ``revoke`` return a new one."""

    def __init__(self, edges: Mapping[str, EdgeRecord] | None = None) -> None:
        self._edges = dict(edges or {})
        self._keys: dict[str, ed25519.Ed25519PublicKey] = {}
        self._revoked_keys: dict[str, ed25519.Ed25519PublicKey] = {}
        owners: dict[str, str] = {}
        for edge_id, record in self._edges.items():
            if not is_edge_id(edge_id):
                raise _malformed(f"edge id {edge_id!r} does not match {EDGE_ID_PATTERN}")
            if record.public_key in owners:
                raise _malformed(
                    f"public key of {edge_id!r} is also enrolled as {owners[record.public_key]!r}"
                )
            owners[record.public_key] = edge_id
            try:
                key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(record.public_key))
            except ValueError as exc:
                raise _malformed(f"public key of {edge_id!r}: {exc}") from None
            (self._revoked_keys if record.revoked else self._keys)[edge_id] = key

    def __getitem__(self, edge_id: str) -> EdgeRecord:
        return self._edges[edge_id]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._edges))

    def __len__(self) -> int:
        return len(self._edges)

    def status(self, edge_id: str) -> EdgeStatus:
        """Active, revoked or unknown."""
        record = self._edges.get(edge_id)
        if record is None:
            return EdgeStatus.UNKNOWN
        return EdgeStatus.REVOKED if record.revoked else EdgeStatus.ACTIVE

    def lookup(self, edge_id: str) -> ed25519.Ed25519PublicKey | None:
        """The public key of an active edge; ``None`` for unknown and revoked edges."""
        return self._keys.get(edge_id)

    def active_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        """Every active edge's public key (what secure aggregation takes as enrolled)."""
        return dict(self._keys)

    def lookup_any(self, edge_id: str) -> ed25519.Ed25519PublicKey | None:
        """The public key of an edge, revoked or not (to re-verify what was accepted
        before a revocation); ``None`` for unknown edges."""
        return self._keys.get(edge_id) or self._revoked_keys.get(edge_id)

    def enroll(
        self, edge_id: str, public_key: str, *, replace_key: bool = False, now: str | None = None
    ) -> EdgeRegistry:
        """The registry with ``edge_id`` enrolled under ``public_key`` (hex).

        Enrolling the same key again changes nothing. Another key for an enrolled edge,
        or any key for a revoked edge, needs ``replace_key``; a key that was ever
        revoked (for any edge) is refused for good.
        """
        public_key = public_key.strip().lower()
        current = self._edges.get(edge_id)
        if current is not None and current.public_key == public_key:
            if current.revoked:
                raise EnrollmentError("key-revoked", f"this key of {edge_id!r} was revoked")
            return self
        if current is not None and not replace_key:
            state = "revoked" if current.revoked else "enrolled with another key"
            raise EnrollmentError(
                "already-enrolled", f"{edge_id!r} is {state}; pass --replace to give it a new key"
            )
        if any(r.public_key == public_key and r.revoked for r in self._edges.values()):
            raise EnrollmentError("key-revoked", "this public key was revoked before")
        record = EdgeRecord(public_key=public_key, enrolled_at=now or utc_now())
        return EdgeRegistry({**self._edges, edge_id: record})

    def revoke(self, edge_id: str, *, now: str | None = None) -> EdgeRegistry:
        """The registry with ``edge_id`` revoked (kept, so its key stays refused)."""
        current = self._edges.get(edge_id)
        if current is None:
            raise EnrollmentError("unknown-edge", f"{edge_id!r} is not enrolled")
        if current.revoked:
            return self
        revoked = replace(current, revoked=True, revoked_at=now or utc_now())
        return EdgeRegistry({**self._edges, edge_id: revoked})

    def encode(self) -> bytes:
        """The registry file's bytes: indented JSON, edges sorted."""
        body = {edge_id: self._edges[edge_id].to_json() for edge_id in self}
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> EdgeRegistry:
        """Parse registry bytes strictly (``EnrollmentError(malformed)`` otherwise)."""
        if len(data) > MAX_REGISTRY_BYTES:
            raise _malformed(f"registry is {len(data)} bytes, over {MAX_REGISTRY_BYTES}")
        try:
            raw = loads_strict(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _malformed(f"registry is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise _malformed("registry is not a JSON object of edge ids")
        edges = {}
        for edge_id, fields in raw.items():
            if not isinstance(fields, dict) or set(fields) != _FIELDS:
                raise _malformed(f"{edge_id!r} must be an object with exactly {sorted(_FIELDS)}")
            edges[edge_id] = EdgeRecord(**fields)
        return cls(edges)


def decode_record(data: bytes) -> EdgeRecord:
    """One edge's record as :meth:`EdgeRecord.encode` wrote it (the KV mirror's value),
    parsed strictly (``EnrollmentError(malformed)`` otherwise)."""
    if len(data) > 4096:
        raise _malformed(f"edge record is {len(data)} bytes, over 4096")
    try:
        fields = loads_strict(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(f"edge record is not JSON: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise _malformed(f"an edge record must be an object with exactly {sorted(_FIELDS)}")
    return EdgeRecord(**fields)


def load_registry(path: Path, *, missing_ok: bool = False) -> EdgeRegistry:
    """Read a registry file; a missing file is an empty registry only with ``missing_ok``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return EdgeRegistry()
        raise EnrollmentError("io", f"edge registry {path} does not exist") from None
    except OSError as exc:
        raise EnrollmentError("io", f"cannot read edge registry {path}: {exc}") from None
    return EdgeRegistry.decode(data)


def save_registry(path: Path, registry: EdgeRegistry) -> None:
    """Write a registry file atomically (temporary file, fsync, rename)."""
    try:
        write_atomic(path, registry.encode(), 0o644)
    except OSError as exc:
        raise EnrollmentError("io", f"cannot write edge registry {path}: {exc}") from None


def _malformed(detail: str) -> EnrollmentError:
    return EnrollmentError("malformed", detail)
