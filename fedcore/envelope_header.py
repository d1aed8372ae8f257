"""The header of a sealed model update: fields, canonical bytes, strict decoding, checks.

The header travels in clear, is signed by the edge and bound as associated data into
every encrypted chunk. Its bytes are compact JSON with sorted keys and ASCII only; a
header whose bytes differ from the canonical encoding of the values it holds is refused,
so every header has exactly one encoding.

``metrics`` is optional: aggregate figures the edge reports with its update (local loss
and accuracy on its held-out split, say), at most :data:`MAX_METRICS` names of
lowercase letters, digits and ``_``, each a finite float. A header without metrics has
no ``metrics`` key at all (``"metrics": null`` is not canonical).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from fedcore.edge_id import EDGE_ID
from fedcore.errors import EnvelopeError
from fedcore.strict_json import loads_strict

FORMAT_VERSION = 1
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_HEADER_BYTES = 4096
MAX_INT = 2**63 - 1

_MODEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TOKEN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_METRIC = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_METRICS = 16

_OPTIONAL = frozenset({"metrics"})
_STRING_FIELDS = {
    "suite": _TOKEN,
    "model": _MODEL,
    "edge_id": EDGE_ID,
    "base_digest": _HEX64,
    "update_id": _HEX32,
    "compression": _TOKEN,
}
_INT_FIELDS = (
    "format",
    "round",
    "base_version",
    "payload_len",
    "chunk_size",
    "chunk_count",
    "num_samples",
)


def chunk_count_for(payload_len: int, chunk_size: int) -> int:
    """Chunks for a payload: ceil(len / size), and one empty chunk for an empty payload."""
    return max(1, -(-payload_len // chunk_size))


@dataclass(frozen=True)
class UpdateHeader:
    """What a sealed update says about itself; every field is signed and bound to the data.

    ``base_digest`` is the hex SHA-256 of the base model the update was computed from,
    ``update_id`` 32 hex characters (16 random bytes) unique per update, ``payload_len``
    the plaintext length, ``compression`` the codec mode of the payload.
    """

    suite: str
    model: str
    round: int
    edge_id: str
    base_version: int
    base_digest: str
    update_id: str
    payload_len: int
    chunk_size: int
    chunk_count: int
    compression: str
    num_samples: int
    format: int = FORMAT_VERSION
    metrics: dict[str, float] | None = None

    def __post_init__(self) -> None:
        for name, pattern in _STRING_FIELDS.items():
            value = getattr(self, name)
            if type(value) is not str or not pattern.fullmatch(value):
                raise _malformed(f"header field {name}={value!r} does not match {pattern.pattern}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_INT:
                raise _malformed(f"header field {name}={value!r} is not an integer in [0, 2^63)")
        self._check_layout()
        self._check_metrics()

    def _check_metrics(self) -> None:
        if self.metrics is None:
            return
        if type(self.metrics) is not dict or len(self.metrics) > MAX_METRICS:
            raise _malformed(f"metrics must be an object of at most {MAX_METRICS} entries")
        for name, value in self.metrics.items():
            if type(name) is not str or not _METRIC.fullmatch(name):
                raise _malformed(f"metric name {name!r} does not match {_METRIC.pattern}")
            if type(value) is not float or not math.isfinite(value):
                raise _malformed(f"metric {name}={value!r} is not a finite number")

    def _check_layout(self) -> None:
        if self.format != FORMAT_VERSION:
            raise _malformed(f"header format {self.format} is not {FORMAT_VERSION}")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise _malformed(
                f"chunk_size {self.chunk_size} is outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )
        expected = chunk_count_for(self.payload_len, self.chunk_size)
        if self.chunk_count != expected:
            raise _malformed(
                f"chunk_count {self.chunk_count} does not match payload_len {self.payload_len} "
                f"in chunks of {self.chunk_size} (expected {expected})"
            )
        if self.chunk_count >= 2**32:
            raise _malformed(f"chunk_count {self.chunk_count} does not fit 32 bits")

    def last_chunk_len(self) -> int:
        """Plaintext bytes in the final chunk."""
        return self.payload_len - self.chunk_size * (self.chunk_count - 1)

    def encode(self) -> bytes:
        """The canonical bytes: compact JSON, keys sorted, ASCII."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if fields["metrics"] is None:
            del fields["metrics"]
        return json.dumps(
            fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> UpdateHeader:
        """Parse canonical header bytes; anything else raises ``EnvelopeError(malformed)``."""
        if len(data) > MAX_HEADER_BYTES:
            raise _malformed(f"header is {len(data)} bytes, more than {MAX_HEADER_BYTES}")
        try:
            raw = loads_strict(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _malformed(f"header is not ASCII JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise _malformed("header is not a JSON object")
        expected = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = expected - raw.keys() - _OPTIONAL, raw.keys() - expected
        if missing or unknown:
            raise _malformed(f"header fields missing {sorted(missing)}, unknown {sorted(unknown)}")
        header = cls(**raw)
        if header.encode() != data:
            raise _malformed("header bytes are not in canonical form")
        return header


def _malformed(detail: str) -> EnvelopeError:
    return EnvelopeError("malformed", detail)


def check_header(
    header: UpdateHeader,
    *,
    model: str,
    round: int,
    base_version: int,
    base_digest: str,
) -> None:
    """Refuse an opened update that is not for this model, round and base model.

    Raises ``EnvelopeError`` with reason ``wrong-model``, ``stale-round`` (an earlier
    round: a replay or a straggler), ``wrong-round`` (a later round than the one open) or
    ``base-mismatch`` (computed from another base model version or digest).
    """
    if header.model != model:
        raise EnvelopeError(
            "wrong-model", f"update is for model {header.model!r}, expected {model!r}"
        )
    if header.round < round:
        raise EnvelopeError(
            "stale-round", f"update is for round {header.round}, round {round} is open"
        )
    if header.round > round:
        raise EnvelopeError(
            "wrong-round", f"update is for round {header.round}, round {round} is open"
        )
    if header.base_version != base_version or header.base_digest != base_digest:
        raise EnvelopeError(
            "base-mismatch",
            f"update is based on version {header.base_version} ({header.base_digest[:12]}), "
            f"round {round} is based on version {base_version} ({base_digest[:12]})",
        )
