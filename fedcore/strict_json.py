"""Strict JSON decoding: the one helper for every parser of adversary bytes.

Python's ``json`` keeps the last copy of a repeated key where other parsers (Triton's,
say) keep the first, so two readers of the same bytes could see different documents:
every strict parse refuses a repeated key, through this module only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class RepeatedKey(ValueError):
    """A JSON object names ``key`` twice (a ``ValueError``, like ``json``'s own errors)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key that appears twice (:class:`RepeatedKey`)."""
    doc = dict(pairs)
    if len(doc) != len(pairs):  # rare: find the first repeated key to name it
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return doc


def strict_decoder(*, parse_float: Callable[[str], Any] | None = None) -> json.JSONDecoder:
    """A decoder refusing repeated keys; ``parse_float`` as ``json.JSONDecoder``'s (a
    parser that only counts elements may pass ``len``: no float object is made)."""
    return json.JSONDecoder(object_pairs_hook=no_duplicates, parse_float=parse_float)


_STRICT = strict_decoder()


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses repeated keys (:class:`RepeatedKey`, a ``ValueError``)."""
    return _STRICT.decode(text)
