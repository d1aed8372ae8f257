"""``POST /v1/feedback``: a label for a request an edge served, joined on that edge.

Body ``{"model": str, "id": str, "label": ..., "weight": float = 1.0}``; ``id`` is the
OIP request ``id`` the client sent with its inference request. The gateway does not know
which edge served (and captured) the request, so it sends the label to the fleet on
``fedgate.feedback.<model>`` and gathers replies for a short, bounded time: the edge
holding the sample joins the label (200), an edge that evicted it says so (410); no
answer at all is a 404. A malformed body is a 422 naming the field; the label must be
what the model's task takes: a class index of the model (``digits``), a number, or a
vector as long as the task's output. Needs a key of role ``infer``. The label goes to the edge
only: the gateway stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from fedcore import subjects
from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.task import check_label
from fedcore.wire import REQUEST_ID, FeedbackReply, FeedbackRequest, WireError
from gateway.errors import GatewayError, NotFound, PayloadTooLarge, Unavailable
from gateway.state import InferKey

log = logging.getLogger(__name__)

router = APIRouter(tags=["feedback"])

MAX_FEEDBACK_BYTES = 4096
GATHER_S = 0.5
"""How long the gateway waits for an edge to claim a request id (404 after that)."""


class FeedbackBody(BaseModel):
    """A label for one served request."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", description="model name")
    id: str = Field(
        pattern=REQUEST_ID.pattern, description="the OIP request id sent with the inference"
    )
    label: JsonValue = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "number"},
                {"type": "array", "items": {"type": "number"}},
            ]
        },
        description=(
            "as the model's task says: a class index below the output's width, a number, "
            "or a vector (multi-hot: 0/1) as long as the output"
        ),
    )
    weight: float = Field(
        default=1.0, gt=0.0, le=1000.0, allow_inf_nan=False, description="sample weight"
    )


@dataclass(frozen=True)
class Claim:
    """The answer the fleet gave: ``joined`` or ``expired`` (and by which edge), or none."""

    status: str | None
    edge_id: str | None = None


class FeedbackRelay:
    """Sends a label to the fleet and gathers the edges' replies (bound to the gateway's
    NATS connection in its lifespan; unbound, feedback answers 503)."""

    def __init__(self, gather_s: float = GATHER_S) -> None:
        self.gather_s = gather_s
        self._nc: NATS | None = None

    def bind(self, nc: NATS | None) -> None:
        self._nc = nc

    async def send(self, request: FeedbackRequest) -> Claim:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise Unavailable("feedback needs the NATS bus, which is not connected")
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(msg: Msg) -> None:
            replies.put_nowait(msg.data)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_reply)
        try:
            await nc.publish(subjects.feedback(request.model), request.encode(), reply=inbox)
            return await self._gather(replies)
        finally:
            await sub.unsubscribe()

    async def _gather(self, replies: asyncio.Queue[bytes]) -> Claim:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather_s
        expired: Claim | None = None
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(replies.get(), left)
            except TimeoutError:
                break
            try:
                reply = FeedbackReply.decode(data)
            except WireError as exc:
                log.warning("dropped feedback reply: %s", exc)
                continue
            if reply.status == "joined":
                return Claim("joined", reply.edge_id)
            expired = Claim("expired", reply.edge_id)
        return expired or Claim(None)


def _relay(request: Request) -> FeedbackRelay:
    relay: FeedbackRelay = request.app.state.feedback
    return relay


Relay = Annotated[FeedbackRelay, Depends(_relay)]


def parse_feedback(body: bytes) -> FeedbackRequest:
    """Validate a feedback body; 422 naming the field, 404 for a model fedgate lacks."""
    if len(body) > MAX_FEEDBACK_BYTES:
        raise PayloadTooLarge(f"feedback body is {len(body)} bytes, over {MAX_FEEDBACK_BYTES}")
    try:
        parsed = FeedbackBody.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise GatewayError(f"{where}: {first['msg']}", 422) from None
    try:
        spec = get_spec(parsed.model)
    except ModelSpecError as exc:
        raise NotFound(str(exc)) from None
    try:
        label = check_label(spec.task, spec.target.width, parsed.label)
    except ValueError as exc:
        raise GatewayError(f"label: {exc} (model {parsed.model!r})", 422) from None
    return FeedbackRequest(model=parsed.model, id=parsed.id, label=label, weight=parsed.weight)


_BODY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": FeedbackBody.model_json_schema()}},
    }
}


@router.post(
    "/v1/feedback",
    openapi_extra=_BODY_SCHEMA,
    responses={
        404: {"description": "no edge holds a sample with this request id"},
        410: {"description": "the sample was captured but has been evicted"},
        422: {"description": "malformed body; the message names the field"},
    },
)
async def post_feedback(request: Request, relay: Relay, _: InferKey) -> dict[str, str]:
    """Join a label with the sample the serving edge captured for request ``id``."""
    feedback = parse_feedback(await request.body())
    claim = await relay.send(feedback)
    if claim.status == "joined" and claim.edge_id is not None:
        return {"status": "joined", "id": feedback.id, "edge": claim.edge_id}
    if claim.status == "expired":
        raise GatewayError(
            f"request id {feedback.id!r} has expired: edge {claim.edge_id} evicted its sample",
            410,
        )
    raise NotFound(
        f"no edge holds a captured sample with request id {feedback.id!r} for model "
        f"{feedback.model!r} (not captured: no id, sampled out, several rows, or unknown)"
    )
