"""``GET /v1/health/ready``: the gateway's own readiness, for probes and load balancers.

200 once the gateway has started (its NATS connection made and the rollout state bound)
and until it begins to shut down, 503 otherwise. It never depends on the edges: with no
edge serving, the dashboard, the fleet and the rollout APIs stay reachable, and inference
answers 503 itself. Whether a model can be served is ``/v2/models/{m}/ready`` (and the
Open Inference Protocol's ``/v2/health/ready``: some edge serves some model). No key.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["health"])


@router.get("/v1/health/ready")
async def gateway_ready(request: Request) -> Response:
    """200 while the gateway itself serves (whatever the edges do), else 503."""
    serving = bool(getattr(request.app.state, "serving", False))
    return Response(status_code=200 if serving else 503)
