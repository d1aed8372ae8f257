"""Round history and version lineage, read from the trainer's KV buckets.

``GET /v1/models/{model}/rounds`` lists the closed rounds (newest last) and the round
open now; ``GET /v1/models/{model}/versions`` lists released versions with their
lineage. Both need a key (any role): they reveal no edge data, only aggregates.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from fedcore.kv import kv_keys
from fedcore.wire import (
    LINEAGE_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
    Lineage,
    RoundAnnouncement,
    RoundRecord,
    WireError,
)
from gateway.errors import Unavailable
from gateway.state import InferKey

router = APIRouter(tags=["learning"])
M = TypeVar("M", RoundRecord, Lineage)


class HistoryReader:
    """Reads the round log, the open round and lineage from NATS KV."""

    def __init__(self) -> None:
        self._js: JetStreamContext | None = None

    def bind(self, nc: NATS) -> None:
        self._js = nc.jetstream()

    def _require(self) -> JetStreamContext:
        if self._js is None:
            raise Unavailable("the gateway is not connected to NATS")
        return self._js

    async def _newest(self, bucket: str, prefix: str, limit: int, kind: type[M]) -> list[M]:
        """Up to ``limit`` decodable values under ``prefix.*``, oldest first."""
        js = self._require()
        try:
            keys = await kv_keys(js, bucket, f"{prefix}.*")
            kv = await js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            return []
        out: list[M] = []
        for key in reversed(keys):
            if len(out) >= limit:
                break
            with contextlib.suppress(KeyNotFoundError, NotFoundError, WireError):
                entry = await kv.get(key)
                if entry.value:
                    out.append(kind.decode(entry.value))
        return out[::-1]

    async def rounds(self, model: str, limit: int) -> list[RoundRecord]:
        return await self._newest(ROUND_LOG_BUCKET, model, limit, RoundRecord)

    async def open_round(self, model: str) -> RoundAnnouncement | None:
        js = self._require()
        try:
            kv = await js.key_value(ROUNDS_BUCKET)
            entry = await kv.get(model)
        except (BucketNotFoundError, KeyNotFoundError, NotFoundError):
            return None
        if not entry.value:
            return None
        with contextlib.suppress(WireError):
            return RoundAnnouncement.decode(entry.value)
        return None

    async def versions(self, model: str, limit: int) -> list[Lineage]:
        return await self._newest(LINEAGE_BUCKET, model, limit, Lineage)


def _reader(request: Request) -> HistoryReader:
    reader: HistoryReader = request.app.state.history
    return reader


Reader = Annotated[HistoryReader, Depends(_reader)]
Limit = Annotated[int, Query(ge=1, le=1000, description="most recent entries to return")]


@router.get("/v1/models/{model}/rounds")
async def list_rounds(
    model: str, reader: Reader, _key: InferKey, limit: Limit = 100
) -> dict[str, Any]:
    """Closed rounds of ``model`` (oldest first) and the round open now, if any."""
    records = await reader.rounds(model, limit)
    current = await reader.open_round(model)
    return {
        "model": model,
        "open": current.model_dump() if current else None,
        "rounds": [r.model_dump() for r in records],
    }


@router.get("/v1/models/{model}/versions")
async def list_versions(
    model: str, reader: Reader, _key: InferKey, limit: Limit = 100
) -> dict[str, Any]:
    """Released versions of ``model`` with their lineage (oldest first)."""
    return {
        "model": model,
        "versions": [v.model_dump() for v in await reader.versions(model, limit)],
    }
