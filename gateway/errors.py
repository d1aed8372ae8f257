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

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for."""
        return {}


class NotFound(GatewayError):
    status = 404


class Unavailable(GatewayError):
    status = 503


class BadRequest(GatewayError):
    status = 400


class PayloadTooLarge(GatewayError):
    status = 413


class Unauthorized(GatewayError):
    """No API key, or one the gateway does not know."""

    status = 401

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="fedgate"'}


class Forbidden(GatewayError):
    """A valid key whose role does not allow the route."""

    status = 403


class RateLimited(GatewayError):
    """The key has used up its request budget; ``retry_after_s`` says when to come back."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}
