"""Model metadata (input and output tensors, max batch size) per model version, from the edges.

Every inference request is checked against it before it is forwarded (:mod:`gateway.guard`)
and refusals are explained with it (:mod:`gateway.validate`). It is fetched on the first
request for a version (Triton's metadata; the batch limit from the model's spec) and kept:
a version number's tensors never change (versions are signed, immutable artifacts).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from gateway.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorSchema:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True, slots=True)
class ModelSchema:
    name: str
    version: int
    inputs: tuple[TensorSchema, ...]
    outputs: tuple[TensorSchema, ...]
    max_batch_size: int = 0  # 0: no batch dimension (or not known)
    output_names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_names", frozenset(t.name for t in self.outputs))

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], version: int, max_batch_size: int = 0
    ) -> ModelSchema:
        """Parse Triton's model metadata JSON; raises ``ValueError`` if it is not that."""

        def tensors(key: str) -> tuple[TensorSchema, ...]:
            items = meta.get(key)
            if not isinstance(items, list):
                raise ValueError(f"model metadata has no {key!r} list")
            out = []
            for t in items:
                if not isinstance(t, dict):
                    raise ValueError(f"model metadata {key!r} entry is not an object")
                shape = t.get("shape")
                if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
                    raise ValueError(f"model metadata {key!r} entry has no integer shape")
                out.append(TensorSchema(str(t.get("name")), str(t.get("datatype")), tuple(shape)))
            return tuple(out)

        name = str(meta.get("name"))
        return cls(name, version, tensors("inputs"), tensors("outputs"), max_batch_size)


def max_batch(model: str) -> int:
    """The model's ``max_batch_size`` from its spec, 0 for a model without one here.

    Triton's ``/config`` is a restricted API on the edges (the gateway has no control
    secret), and its metadata shows the batch dimension only as ``-1``.
    """
    try:
        return get_spec(model).max_batch_size
    except ModelSpecError:
        return 0


class SchemaCache:
    """Schemas by (model, version), at most ``max_entries`` (least recently used go)."""

    def __init__(self, upstream: Upstream, max_entries: int = 256) -> None:
        self.upstream = upstream
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, int], ModelSchema] = OrderedDict()

    def put(self, schema: ModelSchema) -> None:
        key = (schema.name, schema.version)
        self._cache[key] = schema
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def peek(self, model: str, version: int) -> ModelSchema | None:
        """The schema if it is known; no I/O (the hot path's lookup)."""
        return self._cache.get((model, version))

    async def get(self, model: str, version: int, edge_url: str) -> ModelSchema | None:
        """The schema, fetched from ``edge_url`` when not known; None if it cannot be had."""
        key = (model, version)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        path = f"/v2/models/{quote(model, safe='')}/versions/{version}".encode()
        try:
            resp = await self.upstream.send(edge_url, b"GET", path, [], b"")
            if resp.status != 200:
                return None
            schema = ModelSchema.from_metadata(json.loads(resp.body), version, max_batch(model))
        except (UpstreamError, ValueError) as exc:
            log.warning("no metadata for %s version %d: %s", model, version, exc)
            return None
        self.put(schema)
        return schema
