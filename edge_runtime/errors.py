"""Errors of the edge runtime."""

from __future__ import annotations

from fedcore.errors import FedgateError


class EdgeError(FedgateError):
    """Base of the edge runtime's errors."""


class ModelLoadError(EdgeError):
    """Triton refused to load a model version; ``reason`` is Triton's own message."""

    def __init__(self, model: str, version: int | None, reason: str) -> None:
        self.model = model
        self.version = version
        self.reason = reason
        which = model if version is None else f"{model} version {version}"
        super().__init__(f"Triton could not load {which}: {reason}")
