"""Rollouts in NATS KV: compare-and-set on each model's latest rollout, history, desired.

Bucket ``fedgate_rollouts``: key ``<model>`` holds the model's latest rollout and is only
ever written with compare-and-set (``create`` when absent, ``update(last=revision)``
otherwise), so of two gateways (or two requests) racing to start or move a rollout
exactly one wins; ``<model>.<id>`` keeps a copy of every rollout for the history.
Bucket ``fedgate_desired``: key ``<model>`` is the :class:`~fedcore.wire.DesiredVersions`
edges watch. Both survive a gateway restart (JetStream on disk).
"""

from __future__ import annotations

import logging

from nats.js.client import JetStreamContext
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from pydantic import ValidationError

from fedcore.artifact import MANIFEST
from fedcore.artifact_store import MODELS_BUCKET, model_object_name
from fedcore.kv import kv_bucket, kv_keys
from fedcore.wire import DESIRED_BUCKET, ROLLOUTS_BUCKET, DesiredVersions, WireError
from gateway.errors import GatewayError
from gateway.rollout_machine import Rollout

log = logging.getLogger(__name__)

HISTORY_LIMIT = 50


class Conflict(GatewayError):
    """Someone else changed the rollout first (compare-and-set lost), or it is in the way."""

    status = 409


class RolloutStore:
    """The two buckets, opened (and created when missing) by :meth:`open`."""

    def __init__(self, js: JetStreamContext, rollouts: KeyValue, desired: KeyValue) -> None:
        self.js = js
        self._rollouts = rollouts
        self._desired = desired

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> RolloutStore:
        rollouts = await kv_bucket(js, ROLLOUTS_BUCKET, replicas)
        desired = await kv_bucket(js, DESIRED_BUCKET, replicas)
        return cls(js, rollouts, desired)

    @property
    def kv(self) -> KeyValue:
        """The rollouts bucket (also home of the controller lease and the gate counts)."""
        return self._rollouts

    async def models(self) -> list[str]:
        """Models that have (had) a rollout."""
        return [k for k in await kv_keys(self.js, ROLLOUTS_BUCKET, "*") if "." not in k]

    async def current(self, model: str) -> tuple[Rollout, int] | None:
        """The model's latest rollout and its KV revision, or None."""
        try:
            entry = await self._rollouts.get(model)
        except KeyNotFoundError:
            return None
        rollout = _parse(entry.value, model)
        if rollout is None or entry.revision is None:
            return None
        return rollout, entry.revision

    async def replace(self, rollout: Rollout, revision: int | None) -> int:
        """Write ``rollout`` as the model's latest if the key is still at ``revision`` (None:
        absent). Raises :class:`Conflict` when another writer got there first."""
        data = rollout.model_dump_json().encode()
        try:
            if revision is None:
                new = await self._rollouts.create(rollout.model, data)
            else:
                new = await self._rollouts.update(rollout.model, data, last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"rollout of model {rollout.model!r} changed concurrently; read it again"
            ) from None
        await self._rollouts.put(f"{rollout.model}.{rollout.id}", data)
        return int(new)

    async def get(self, model: str, rollout_id: str) -> Rollout | None:
        """One rollout of ``model`` by id (the latest or an archived one)."""
        try:
            entry = await self._rollouts.get(f"{model}.{rollout_id}")
        except KeyNotFoundError:
            return None
        return _parse(entry.value, model)

    async def history(self, model: str, limit: int = HISTORY_LIMIT) -> list[Rollout]:
        """The model's rollouts, newest first."""
        found = []
        for key in await kv_keys(self.js, ROLLOUTS_BUCKET, f"{model}.*"):
            try:
                entry = await self._rollouts.get(key)
            except KeyNotFoundError:
                continue
            rollout = _parse(entry.value, model)
            if rollout is not None:
                found.append(rollout)
        found.sort(key=lambda r: r.created_ts, reverse=True)
        return found[:limit]

    async def desired(self, model: str) -> DesiredVersions | None:
        try:
            entry = await self._desired.get(model)
        except KeyNotFoundError:
            return None
        try:
            return DesiredVersions.decode(entry.value or b"")
        except WireError as exc:
            log.warning("unreadable desired versions of %s: %s", model, exc)
            return None

    async def put_desired(self, desired: DesiredVersions) -> None:
        await self._desired.put(desired.model, desired.encode())

    async def version_exists(self, model: str, version: int) -> bool:
        """True when the signed version's manifest is in the model store."""
        try:
            store = await self.js.object_store(MODELS_BUCKET)
            await store.get_info(model_object_name(model, version, MANIFEST))
        except (BucketNotFoundError, NotFoundError):
            return False
        return True


def _parse(value: bytes | None, model: str) -> Rollout | None:
    try:
        rollout = Rollout.model_validate_json(value or b"")
    except ValidationError as exc:
        log.warning("unreadable rollout record of %s: %s", model, exc.errors()[0]["msg"])
        return None
    return rollout if rollout.model == model else None
