"""The rollout API (admin keys only).

- ``POST /v1/models/{model}/rollouts``: start one (body :class:`RolloutSpec`); 201 with
  the rollout, 200 with the existing one when the same command comes again, 409 while
  another rollout of the model is active (or the version already serves), 404 when the
  version is not in the model store.
- ``GET /v1/models/{model}/rollouts``: the model's rollouts, newest first.
- ``GET /v1/models/{model}/rollouts/{id}``: one rollout, with the live observation of
  its canary stage (per-version requests, errors, p99, labels) and the split in force.
- ``POST /v1/models/{model}/rollouts/{id}/promote`` and ``.../rollback``: 200 with the
  rollout after the command (repeating it is a no-op), 409 when its state forbids it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from fedcore.wire import MODEL_NAME, ROLLOUT_ID
from gateway.errors import BadRequest, NotFound, Unavailable
from gateway.rollout_control import RolloutController
from gateway.rollout_machine import Rollout, RolloutSpec, evaluate
from gateway.state import AdminKey

log = logging.getLogger(__name__)
router = APIRouter(tags=["rollouts"])


def _controller(request: Request) -> RolloutController:
    controller: RolloutController | None = getattr(request.app.state, "rollouts", None)
    if controller is None or controller.store is None:
        raise Unavailable("rollouts need the NATS bus, which is not connected")
    return controller


Controller = Annotated[RolloutController, Depends(_controller)]


def _model(model: str) -> str:
    if not MODEL_NAME.match(model):
        raise NotFound(f"model name {model!r} is not valid")
    return model


def _id(rollout_id: str) -> str:
    if not ROLLOUT_ID.match(rollout_id):
        raise NotFound(f"rollout id {rollout_id!r} is not valid")
    return rollout_id


def view(controller: RolloutController, r: Rollout, *, live: bool = False) -> dict[str, Any]:
    """The API's JSON of a rollout; ``live`` adds the observation and the split in force."""
    out: dict[str, Any] = r.model_dump(mode="json")
    out["weight"] = r.weight
    if live:
        split = controller.state.router.splits.get(r.model)
        out["split"] = split.model_dump() if split is not None else None
        if r.state == "canary":
            obs = controller.observe(r)
            out["observation"] = {
                "elapsed_s": round(obs.elapsed_s, 3),
                "candidate": vars(obs.candidate),
                "stable": vars(obs.stable),
                "metric": {"name": obs.metric.name, "direction": obs.metric.direction},
                "verdict": evaluate(r.spec, obs).message,
            }
    return out


_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RolloutSpec.model_json_schema()}},
    }
}


@router.post("/v1/models/{model}/rollouts", openapi_extra=_BODY, status_code=201)
async def start_rollout(
    principal: AdminKey, controller: Controller, request: Request, response: Response, model: str
) -> dict[str, Any]:
    """Roll ``version`` out: stage it on every edge, canary it behind the gates, promote."""
    try:
        spec = RolloutSpec.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"rollout {where}: {first['msg']}") from None
    rollout, created = await controller.start(_model(model), spec, principal.name)
    if not created:
        response.status_code = 200
    return view(controller, rollout, live=True)


@router.get("/v1/models/{model}/rollouts")
async def list_rollouts(_: AdminKey, controller: Controller, model: str) -> dict[str, Any]:
    """The model's rollouts, newest first."""
    assert controller.store is not None
    rollouts = await controller.store.history(_model(model))
    return {"model": model, "rollouts": [view(controller, r) for r in rollouts]}


@router.get("/v1/models/{model}/rollouts/{rollout_id}")
async def get_rollout(
    _: AdminKey, controller: Controller, model: str, rollout_id: str
) -> dict[str, Any]:
    """One rollout with its events, and while it is a canary, what the gates observe."""
    assert controller.store is not None
    rollout = await controller.store.get(_model(model), _id(rollout_id))
    if rollout is None:
        raise NotFound(f"model {model!r} has no rollout {rollout_id!r}")
    return view(controller, rollout, live=True)


@router.post("/v1/models/{model}/rollouts/{rollout_id}/promote")
async def promote_rollout(
    principal: AdminKey, controller: Controller, model: str, rollout_id: str
) -> dict[str, Any]:
    """Send all traffic to the candidate now (a canary only); the old version is unloaded."""
    rollout = await controller.command(_model(model), _id(rollout_id), "promote", principal.name)
    return view(controller, rollout, live=True)


@router.post("/v1/models/{model}/rollouts/{rollout_id}/rollback")
async def rollback_rollout(
    principal: AdminKey, controller: Controller, model: str, rollout_id: str
) -> dict[str, Any]:
    """Send all traffic back to the stable version; the candidate is unloaded."""
    rollout = await controller.command(_model(model), _id(rollout_id), "rollback", principal.name)
    return view(controller, rollout, live=True)
