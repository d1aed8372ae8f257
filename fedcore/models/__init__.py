"""The models fedgate knows, by name."""

from __future__ import annotations

from fedcore.errors import ModelSpecError
from fedcore.models.digits import DIGITS
from fedcore.models.wide import HIDDEN_VAR, WIDE
from fedcore.spec import ModelSpec

REGISTRY: dict[str, ModelSpec] = {DIGITS.name: DIGITS, WIDE.name: WIDE}
MODEL_VARS = frozenset({HIDDEN_VAR})
"""Environment variables built-in models read (every service of a stack gets them)."""


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; a clear error naming the known models otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelSpecError(f"unknown model {name!r}; known: {sorted(REGISTRY)}") from None
