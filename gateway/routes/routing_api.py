"""Per-model routing: read the traffic split (any key), set or clear it (admin keys only).

The rollout code sets the split through :meth:`gateway.routing.Router.set_split`; these
routes expose the same operation to operators.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from gateway.errors import BadRequest
from gateway.routing import TrafficSplit
from gateway.state import AdminKey, GatewayState, InferKey, State

log = logging.getLogger(__name__)
router = APIRouter(tags=["routing"])


def _view(state: GatewayState, model: str) -> dict[str, object]:
    split = state.router.splits.get(model)
    return {
        "model": model,
        "split": split.model_dump() if split else None,
        "served_versions": state.fleet.versions(model),
        "default_version": state.router.default_version(model),
    }


@router.get("/v1/models/{model}/routing")
async def get_routing(state: State, _: InferKey, model: str) -> dict[str, object]:
    """The model's traffic split (null: unversioned requests go to the newest version)."""
    return _view(state, model)


_SPLIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TrafficSplit.model_json_schema()}},
    }
}


@router.put("/v1/models/{model}/routing", openapi_extra=_SPLIT_BODY)
async def put_routing(
    state: State, principal: AdminKey, request: Request, model: str
) -> dict[str, object]:
    """Set the split of the model's unversioned traffic between stable and candidate.

    The body is JSON whatever the ``Content-Type`` says (``curl -d`` works as is).
    """
    try:
        split = TrafficSplit.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"traffic split {where}: {first['msg']}") from None
    state.router.set_split(model, split)
    log.info(
        "traffic split of %s set by %s: %s",
        model,
        principal.name,
        split.model_dump_json(),
        extra={"model": model},
    )
    return _view(state, model)


@router.delete("/v1/models/{model}/routing", status_code=204)
async def delete_routing(state: State, principal: AdminKey, model: str) -> Response:
    """Clear the split: unversioned requests go to the newest served version again."""
    state.router.set_split(model, None)
    log.info("traffic split of %s cleared by %s", model, principal.name, extra={"model": model})
    return Response(status_code=204)
