"""The update transport on NATS JetStream, sans-IO: names, the pointer message, limits.

Edges publish sealed updates (:mod:`fedcore.envelope`) on ``fedgate.updates.<model>.<edge>``
into the file-backed stream ``FEDGATE_UPDATES``, with ``Nats-Msg-Id`` set to the update
id so the stream drops a re-publish inside its duplicate window. One subject per edge
lets NATS permissions confine each edge to its own subject.

An envelope too large for one message (the server's ``max_payload``, less room for
headers) goes into the object store bucket ``fedgate_updates``; the stream then carries
a small pointer message::

    "FGUP" | canonical JSON {"bucket", "name", "sha256", "size"}

The pointer is not signed (the envelope it points to is); the receiver checks the
object's size and SHA-256 against the pointer before opening it. Everything here is pure:
the I/O lives in ``edge_runtime.publisher`` and ``trainer.ingest``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from fedcore.edge_id import EDGE_ID_PATTERN, is_edge_id
from fedcore.errors import TransportError
from fedcore.strict_json import loads_strict

UPDATES_STREAM = "FEDGATE_UPDATES"
UPDATES_PREFIX = "fedgate.updates"
UPDATES_OBJECT_BUCKET = "fedgate_updates"
LEDGER_BUCKET = "fedgate_ledger"
EDGES_BUCKET = "fedgate_edges"
TRAINER_CONSUMER = "trainer-updates"
MSG_ID_HEADER = "Nats-Msg-Id"

HEADER_ROOM = 4096
INLINE_MAX_BYTES = 256 * 1024
"""Largest message (envelope and headers) on the updates stream: the stream's
``max_msg_size`` and the edges' inline limit (larger envelopes go through the object
store), so one edge's subject holds at most ``max_msgs_per_subject`` times this."""
GIB = 1024**3
"""Bytes of a message's ``max_payload`` kept for NATS headers (``Nats-Msg-Id`` etc.)."""

POINTER_MAGIC = b"FGUP"
MAX_POINTER_BYTES = 1024
MAX_OBJECT_SIZE = 2**40

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_BUCKET = re.compile(r"[A-Za-z0-9_-]{1,64}")
_OBJECT_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,128}}/{EDGE_ID_PATTERN}/[0-9a-f]{{32}}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _model_token(model: str) -> str:
    if not _TOKEN.fullmatch(model):
        raise TransportError(
            "bad-subject", f"model {model!r} cannot be a subject token (letters, digits, _ -)"
        )
    return model


def update_subject(model: str, edge_id: str) -> str:
    """The subject ``edge_id`` publishes its updates for ``model`` on."""
    if not is_edge_id(edge_id):
        raise TransportError("bad-subject", f"edge id {edge_id!r} is not a valid edge id")
    return f"{UPDATES_PREFIX}.{_model_token(model)}.{edge_id}"


def updates_filter(model: str | None = None) -> str:
    """The subject filter for every update, or every update of ``model``."""
    if model is None:
        return f"{UPDATES_PREFIX}.>"
    return f"{UPDATES_PREFIX}.{_model_token(model)}.*"


def parse_update_subject(subject: str) -> tuple[str, str]:
    """(model, edge id) of an update subject; ``TransportError(bad-subject)`` otherwise."""
    parts = subject.split(".")
    if (
        len(parts) != 4
        or ".".join(parts[:2]) != UPDATES_PREFIX
        or not _TOKEN.fullmatch(parts[2])
        or not is_edge_id(parts[3])
    ):
        raise TransportError("bad-subject", f"{subject!r} is not {UPDATES_PREFIX}.<model>.<edge>")
    return parts[2], parts[3]


def update_object_name(model: str, edge_id: str, update_id: str) -> str:
    """The object store name of an envelope too large to travel inline."""
    name = f"{model}/{edge_id}/{update_id}"
    if not _OBJECT_NAME.fullmatch(name):
        raise TransportError("bad-pointer", f"cannot name an object {name!r}")
    return name


def fits_inline(size: int, max_payload: int) -> bool:
    """Whether an envelope of ``size`` bytes fits one message under ``max_payload``."""
    return size + HEADER_ROOM <= max_payload


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``data`` (the digest the pointer and the ledger carry)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class UpdatePointer:
    """Where an envelope too large for a message lies: bucket, object name, digest, size."""

    bucket: str
    name: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if type(self.bucket) is not str or not _BUCKET.fullmatch(self.bucket):
            raise _bad(f"bucket {self.bucket!r} is not a bucket name")
        if type(self.name) is not str or not _OBJECT_NAME.fullmatch(self.name):
            raise _bad(f"name {self.name!r} is not <model>/<edge>/<update id>")
        if type(self.sha256) is not str or not _HEX64.fullmatch(self.sha256):
            raise _bad("sha256 is not 64 lowercase hex characters")
        if type(self.size) is not int or not 0 < self.size <= MAX_OBJECT_SIZE:
            raise _bad(f"size {self.size!r} is not an integer in (0, 2^40]")

    @classmethod
    def for_envelope(
        cls, envelope: bytes | bytearray | memoryview, bucket: str, name: str
    ) -> UpdatePointer:
        """The pointer to ``envelope`` stored as ``bucket``/``name``."""
        return cls(bucket=bucket, name=name, sha256=sha256_hex(envelope), size=len(envelope))

    def encode(self) -> bytes:
        """Magic, then compact JSON with sorted keys."""
        fields = {
            "bucket": self.bucket,
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
        }
        return POINTER_MAGIC + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> UpdatePointer:
        """Parse a pointer message; anything but the canonical encoding is refused."""
        raw = bytes(data)
        if len(raw) > MAX_POINTER_BYTES:
            raise _bad(f"pointer is {len(raw)} bytes, over {MAX_POINTER_BYTES}")
        if not raw.startswith(POINTER_MAGIC):
            raise _bad("not a pointer message (bad magic)")
        try:
            fields = loads_strict(raw[len(POINTER_MAGIC) :].decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _bad(f"pointer is not ASCII JSON: {exc}") from None
        if not isinstance(fields, dict) or set(fields) != {"bucket", "name", "sha256", "size"}:
            raise _bad("pointer must be an object with exactly bucket, name, sha256, size")
        pointer = cls(**fields)
        if pointer.encode() != raw:
            raise _bad("pointer bytes are not in canonical form")
        return pointer

    def check(self, data: bytes | bytearray | memoryview) -> None:
        """Refuse object bytes whose size or SHA-256 differ from the pointer's."""
        if len(data) != self.size:
            raise _bad(f"object {self.name} is {len(data)} bytes, pointer says {self.size}")
        if sha256_hex(data) != self.sha256:
            raise _bad(f"object {self.name} does not match the pointer's SHA-256")


def is_pointer(data: bytes | bytearray | memoryview) -> bool:
    """Whether a message body is a pointer (rather than an inline envelope)."""
    return bytes(memoryview(data)[: len(POINTER_MAGIC)]) == POINTER_MAGIC


@dataclass(frozen=True)
class StreamSpec:
    """Values of the updates stream and object bucket, as the trainer creates them.

    ``storage`` is file: updates survive a server restart. Retention is by age
    (``max_age_s``), not work-queue: an accepted update stays readable by its stream
    sequence until its round is finalised, so a restarted trainer can fold it again
    (see ``trainer.ledger``). ``max_msg_size`` is the server's ``max_payload`` unless
    given (``-1``: the server's limit).

    Limits, so that one edge cannot fill JetStream for everyone: the stream holds at most
    ``max_bytes``, one subject (one model of one edge) at most ``max_msgs_per_subject``
    messages, and both refuse new messages when full (discard new, per subject too):
    nobody's acknowledged update is dropped to make room. The object bucket holds at most
    ``object_max_bytes``.
    """

    name: str = UPDATES_STREAM
    subjects: tuple[str, ...] = (f"{UPDATES_PREFIX}.>",)
    duplicate_window_s: float = 120.0
    max_age_s: float = 7 * 24 * 3600.0
    max_msg_size: int = -1
    replicas: int = 1
    object_bucket: str = UPDATES_OBJECT_BUCKET
    max_bytes: int = 8 * GIB
    max_msgs_per_subject: int = 10_000
    object_max_bytes: int = 8 * GIB

    def __post_init__(self) -> None:
        if self.duplicate_window_s <= 0 or self.max_age_s < self.duplicate_window_s:
            raise ValueError("need 0 < duplicate_window_s <= max_age_s")
        if min(self.max_bytes, self.max_msgs_per_subject, self.object_max_bytes) <= 0:
            raise ValueError("max_bytes, max_msgs_per_subject and object_max_bytes must be > 0")
        if self.replicas not in (1, 3, 5):
            raise ValueError(f"replicas {self.replicas} is not 1, 3 or 5")


def _bad(detail: str) -> TransportError:
    return TransportError("bad-pointer", detail)
