"""The accepted-update ledger: one record per (model, round, edge), first writer wins.

Records live in the NATS KV bucket ``fedgate_ledger`` under ``<model>.<round>.<edge>``
and are written with ``create``, which succeeds only if the key does not exist. An
update counts only once its record is written, and its message is acknowledged only
after that, so redelivery, a re-publish after the stream's duplicate window, or a
replay of the same envelope all find the record and are not counted again.

Exactly-once across a trainer restart needs the ledger and the round state to agree.
The ledger is durable at once, the round state (a running sum) only at checkpoints, so
each record carries what is needed to rebuild a contribution: the update id, the SHA-256
of the envelope and the stream sequence of the message that carried it (the updates
stream keeps messages by age, not by acknowledgement). A round checkpoint stores the set
of update ids folded into it; on resume, :meth:`UpdateLedger.accepted` minus that set is
what was accepted after the checkpoint, and ``trainer.ingest.UpdateIngestor.refold``
folds exactly those again from the stream. Nothing is counted twice (the ledger refuses
a second record) and nothing acknowledged is lost (its record points at its message).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from fedcore.edge_id import is_edge_id
from fedcore.errors import FedgateError
from fedcore.kv import kv_bucket, kv_keys
from fedcore.transport import LEDGER_BUCKET

_MODEL = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("update_id", "digest", "stream_seq", "num_samples", "accepted_at")


class LedgerRecordError(FedgateError):
    """A ledger record does not decode (the bucket was written by something else)."""


@dataclass(frozen=True)
class LedgerRecord:
    """What the ledger keeps of an accepted update (see the module doc for why)."""

    update_id: str
    digest: str
    stream_seq: int
    num_samples: int
    accepted_at: float

    def __post_init__(self) -> None:
        if type(self.update_id) is not str or not _HEX32.fullmatch(self.update_id):
            raise LedgerRecordError(f"update_id {self.update_id!r} is not 32 hex characters")
        if type(self.digest) is not str or not _HEX64.fullmatch(self.digest):
            raise LedgerRecordError(f"digest {self.digest!r} is not 64 hex characters")
        for name in ("stream_seq", "num_samples"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise LedgerRecordError(f"{name} {value!r} is not a non-negative integer")
        if type(self.accepted_at) not in (int, float):
            raise LedgerRecordError(f"accepted_at {self.accepted_at!r} is not a number")

    def encode(self) -> bytes:
        fields = {name: getattr(self, name) for name in _FIELDS}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LedgerRecord:
        try:
            raw: Any = json.loads(data)
        except ValueError as exc:
            raise LedgerRecordError(f"ledger record is not JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
            raise LedgerRecordError(f"ledger record must hold exactly {list(_FIELDS)}")
        return cls(**raw)

    @classmethod
    def now(cls, update_id: str, digest: str, stream_seq: int, num_samples: int) -> LedgerRecord:
        return cls(update_id, digest, stream_seq, num_samples, round(time.time(), 3))


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`UpdateLedger.record`.

    ``first``: this call wrote the record. Otherwise ``record`` is the one already there
    (same ``update_id``: the same update again; another id: a second update from an edge
    that already contributed to the round). ``revision`` is the record's KV revision.
    """

    first: bool
    record: LedgerRecord
    revision: int


def ledger_key(model: str, round: int, edge_id: str) -> str:
    """``<model>.<round>.<edge>``; refuses names that would not be one KV key token each."""
    if not _MODEL.fullmatch(model) or not is_edge_id(edge_id):
        raise ValueError(f"bad ledger key parts: model {model!r}, edge {edge_id!r}")
    if type(round) is not int or round < 0:
        raise ValueError(f"round {round!r} is not a non-negative integer")
    return f"{model}.{round}.{edge_id}"


class UpdateLedger:
    """The ledger over a KV bucket (use :meth:`open`)."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str) -> None:
        self._js = js
        self._kv = kv
        self._bucket = bucket

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, bucket: str = LEDGER_BUCKET, replicas: int = 1
    ) -> UpdateLedger:
        """Bind to the ledger bucket, creating it (file storage, history 1) if missing; an
        existing one with fewer than ``replicas`` is scaled up."""
        config = KeyValueConfig(
            bucket=bucket,
            history=1,
            storage=StorageType.FILE,
            description="fedgate: accepted updates, one per (model, round, edge)",
        )
        return cls(js, await kv_bucket(js, bucket, replicas, config), bucket)

    async def record(self, model: str, round: int, edge_id: str, record: LedgerRecord) -> Claim:
        """Write ``record`` for (model, round, edge) unless one is there already."""
        key = ledger_key(model, round, edge_id)
        try:
            revision = await self._kv.create(key, record.encode())
        except KeyWrongLastSequenceError:
            entry = await self._kv.get(key)
            return Claim(False, LedgerRecord.decode(entry.value or b""), entry.revision or 0)
        return Claim(True, record, revision)

    async def release(self, model: str, round: int, edge_id: str, revision: int) -> None:
        """Undo a claim whose fold failed (compare-and-delete on its revision)."""
        await self._kv.delete(ledger_key(model, round, edge_id), last=revision)

    async def accepted(self, model: str, round: int) -> dict[str, LedgerRecord]:
        """Every record of (model, round), by edge id."""
        prefix = ledger_key(model, round, "x")[:-1]
        out: dict[str, LedgerRecord] = {}
        for key in await kv_keys(self._js, self._bucket, f"{prefix}*"):
            try:
                entry = await self._kv.get(key)
            except NotFoundError:  # released (deleted) claims
                continue
            if entry.value:
                out[key.removeprefix(prefix)] = LedgerRecord.decode(entry.value)
        return out
