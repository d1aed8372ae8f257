"""Errors of the gateway. Every one maps to an HTTP status and Triton's ``{"error": ...}``."""

from __future__ import annotations

from fedcore.errors import FedgateError


class GatewayError(FedgateError):
    """Base of the gateway's errors; ``status`` is the HTTP status it answers with."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        self.message = message
        super().__init__(message)


class NotFound(GatewayError):
    status = 404


class Unavailable(GatewayError):
    status = 503


class BadRequest(GatewayError):
    status = 400


class PayloadTooLarge(GatewayError):
    status = 413
