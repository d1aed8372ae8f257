"""Per-model routing: read the traffic split (any key), set or clear it (admin keys only).

The rollout code sets the split through :meth:`gateway.routing.Router.set_split`; these
routes expose the same operation to operators.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response

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


@router.put("/v1/models/{model}/routing")
async def put_routing(
    state: State, principal: AdminKey, model: str, split: TrafficSplit
) -> dict[str, object]:
    """Set the split of the model's unversioned traffic between stable and candidate."""
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
