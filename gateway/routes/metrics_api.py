"""``GET /metrics``: Prometheus exposition of the gateway's metrics (any valid key; a
``metrics`` key, a scraper's, is good for this route only)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.metrics import CONTENT_TYPE
from gateway.state import MetricsKey, State

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(state: State, _: MetricsKey) -> Response:
    return Response(state.metrics.render(state.fleet), media_type=CONTENT_TYPE)
