"""``POST /v1/feedback``: a label for a request an edge served, joined on that edge.

Body ``{"model": str, "id": str, "label": ..., "weight": float = 1.0}``; ``id`` is the
OIP request ``id`` the client sent with its inference request. With the
``x-fedgate-feedback-token`` header of that request's response (:mod:`gateway.feedback_token`)
the label goes to the edge that served it, on ``fedgate.feedback.<model>-<edge>``, which
always answers; without one (or when that edge does not hold the id or does not answer
within ``DIRECT_S``) it goes to the fleet on ``fedgate.feedback.<model>`` and replies are
gathered for ``GATHER_S``. The edge holding the sample joins the label (200), an edge that
evicted it says so (410); nobody is a 404. A label binds to the key that made the request:
the edge spooled it as ``<key name>/<id>`` and the gateway asks for the caller's key, so
another key's label for the same id, or a token minted for another key or model, is the
same 404 as an unknown id (nothing says whether the id exists). A malformed body is a 422
naming the field; the label must be what the model's task takes: a class index of the
model (``digits``), a number, or a vector as long as the task's output. Needs a key of
role ``infer``. The label goes to the edge only: the gateway stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from fedcore import subjects
from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.task import check_label
from fedcore.wire import REQUEST_ID, FeedbackReply, FeedbackRequest, WireError
from gateway.errors import GatewayError, NotFound, PayloadTooLarge, Unavailable
from gateway.feedback_token import HEADER as TOKEN_HEADER
from gateway.state import InferKey

log = logging.getLogger(__name__)

router = APIRouter(tags=["feedback"])

MAX_FEEDBACK_BYTES = 4096
GATHER_S = 0.5
"""How long the gateway waits for an edge to claim a request id (404 after that)."""
DIRECT_S = 2.0
"""How long the gateway waits for the edge named by a token before asking the fleet."""


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

    def __init__(self, gather_s: float = GATHER_S, direct_s: float = DIRECT_S) -> None:
        self.gather_s = gather_s
        self.direct_s = direct_s
        self._nc: NATS | None = None

    def bind(self, nc: NATS | None) -> None:
        self._nc = nc

    def _bus(self) -> NATS:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise Unavailable("feedback needs the NATS bus, which is not connected")
        return nc

    async def send(self, request: FeedbackRequest, edge: str | None = None) -> Claim:
        """The label to ``edge`` when given (the fleet if it holds no such id or is
        silent), else to the fleet."""
        if edge is not None:
            claim = await self.ask_edge(request, edge)
            if claim.status is not None:
                return claim
        return await self.ask_fleet(request)

    async def ask_edge(self, request: FeedbackRequest, edge: str) -> Claim:
        """Ask one edge; ``Claim(None)`` when it does not hold the id or does not answer."""
        subject = subjects.feedback_to_edge(request.model, edge)
        try:
            msg = await self._bus().request(subject, request.encode(), timeout=self.direct_s)
            reply = FeedbackReply.decode(msg.data)
        except (TimeoutError, NatsError, WireError) as exc:
            log.info("edge %s did not take feedback (%r): asking the fleet", edge, exc)
            return Claim(None)
        if reply.status == "unknown" or reply.edge_id != edge:
            return Claim(None)
        return Claim(reply.status, reply.edge_id)

    async def ask_fleet(self, request: FeedbackRequest) -> Claim:
        """Send to every edge of the model and gather replies for ``gather_s``."""
        nc = self._bus()
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
            if reply.status == "expired":
                expired = Claim("expired", reply.edge_id)
        return expired or Claim(None)


def _relay(request: Request) -> FeedbackRelay:
    relay: FeedbackRelay = request.app.state.feedback
    return relay


Relay = Annotated[FeedbackRelay, Depends(_relay)]


def parse_feedback(body: bytes, key: str | None = None) -> FeedbackRequest:
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
    return FeedbackRequest(
        model=parsed.model, id=parsed.id, label=label, weight=parsed.weight, key=key
    )


def _token_edge(request: Request, feedback: FeedbackRequest) -> tuple[str | None, bool]:
    """(the edge the request's token names, whether the token is another key's or model's).

    A token that is forged, malformed or expired is ignored (the fleet is asked)."""
    raw = request.headers.get(TOKEN_HEADER)
    tokens = request.app.state.gateway.tokens
    if raw is None or tokens is None:
        return None, False
    served = tokens.verify(raw)
    if served is None:
        return None, False
    if served.key != feedback.key or served.model != feedback.model:
        return None, True
    return served.edge, False


_BODY_SCHEMA: dict[str, Any] = {
    "parameters": [
        {
            "name": TOKEN_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "the feedback token of the inference response: the label goes to "
            "the edge that served it alone (the fleet without it)",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": FeedbackBody.model_json_schema()}},
    },
}


@router.post(
    "/v1/feedback",
    openapi_extra=_BODY_SCHEMA,
    responses={
        404: {"description": "no edge holds a sample with this request id made with this key"},
        410: {"description": "the sample was captured but has been evicted"},
        422: {"description": "malformed body; the message names the field"},
    },
)
async def post_feedback(request: Request, relay: Relay, key: InferKey) -> dict[str, str]:
    """Join a label with the sample the serving edge captured for request ``id``."""
    feedback = parse_feedback(await request.body(), key.name)
    edge, foreign = _token_edge(request, feedback)
    claim = Claim(None) if foreign else await relay.send(feedback, edge)
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
