"""``GET /metrics``: Prometheus exposition of the gateway's metrics (any valid key)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.metrics import CONTENT_TYPE
from gateway.state import InferKey, State

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(state: State, _: InferKey) -> Response:
    return Response(state.metrics.render(state.fleet), media_type=CONTENT_TYPE)
