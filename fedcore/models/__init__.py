"""The models fedgate knows, by name."""

from __future__ import annotations

from fedcore.errors import ModelSpecError
from fedcore.models.digits import DIGITS
from fedcore.models.wide import WIDE
from fedcore.spec import ModelSpec

REGISTRY: dict[str, ModelSpec] = {DIGITS.name: DIGITS, WIDE.name: WIDE}


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; a clear error naming the known models otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelSpecError(f"unknown model {name!r}; known: {sorted(REGISTRY)}") from None
