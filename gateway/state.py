"""What the gateway's routes share, and the ``Annotated`` dependencies that hand it out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import KeyRing, Principal, RateLimiter, Role, require
from gateway.errors import GatewayError
from gateway.feedback_token import FeedbackTokens
from gateway.fleet import Fleet
from gateway.metrics import GatewayMetrics
from gateway.routing import Router
from gateway.schemas import SchemaCache
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream

DENIAL_REASONS = {401: "unauthorized", 403: "forbidden", 429: "rate-limited"}


@dataclass
class GatewayState:
    settings: GatewaySettings
    fleet: Fleet
    upstream: Upstream
    router: Router
    keys: KeyRing
    limiter: RateLimiter
    metrics: GatewayMetrics
    schemas: SchemaCache
    tokens: FeedbackTokens | None = None
    """Mints and checks feedback tokens; None without ``feedback_secret_file``."""

    def admit(self, authorization: bytes | None, role: Role) -> Principal:
        """Authenticate, authorize and rate-limit one request (401, 403, 429)."""
        try:
            principal = require(self.keys.authenticate(authorization), role)
            self.limiter.check(principal)
        except GatewayError as exc:
            self.metrics.denied.labels(DENIAL_REASONS.get(exc.status, "other")).inc()
            raise
        return principal


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def _authorization(request: Request) -> bytes | None:
    value = request.headers.get("authorization")
    return value.encode("latin-1") if value is not None else None


def _infer_key(request: Request) -> Principal:
    return _state(request).admit(_authorization(request), "infer")


def _metrics_key(request: Request) -> Principal:
    return _state(request).admit(_authorization(request), "metrics")


def _admin_key(request: Request) -> Principal:
    return _state(request).admit(_authorization(request), "admin")


State = Annotated[GatewayState, Depends(_state)]
InferKey = Annotated[Principal, Depends(_infer_key)]
"""A request with a key of role ``infer`` or ``admin`` (else 401/403/429)."""
MetricsKey = Annotated[Principal, Depends(_metrics_key)]
"""A request with a key of any role: ``metrics`` (a scraper's), ``infer`` or ``admin``."""
AdminKey = Annotated[Principal, Depends(_admin_key)]
"""A request with a key of role ``admin`` (else 401/403/429)."""
