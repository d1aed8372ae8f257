"""Strict JSON decoding shared by every parser of adversary bytes in the kernel."""

from __future__ import annotations

import json
from typing import Any


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key that appears twice (``ValueError``)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys."""
    return json.loads(text, object_pairs_hook=no_duplicates)
