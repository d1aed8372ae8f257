"""Model metadata (input and output tensors) per model version, fetched from the edges.

Used only to explain a refused inference request, so it is fetched on the first refusal
for a version and kept: a version number's tensors never change (versions are signed,
immutable artifacts).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], version: int) -> ModelSchema:
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

        return cls(str(meta.get("name")), version, tensors("inputs"), tensors("outputs"))


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
            schema = ModelSchema.from_metadata(json.loads(resp.body), version)
        except (UpstreamError, ValueError) as exc:
            log.warning("no metadata for %s version %d: %s", model, version, exc)
            return None
        self.put(schema)
        return schema
