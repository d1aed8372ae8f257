"""``POST /v2/models/{model}[/versions/{version}]/infer`` as a raw ASGI callable: the data plane.

Per request: scan the headers once, check the key and its rate and refuse repeated framing
headers (all before any body is read), read the body (413 past the limit), check the
binary framing header, pick version and edge, check the request against the model's
schema (:mod:`gateway.guard`: shapes, counts, sizes, datatypes), forward the bytes, relay
the answer with headers naming edge and version, count it. No element is decoded and no
FastAPI machinery runs. When an edge still refuses a request the gateway explains it, with
a 400 that names the input and what is wrong (:mod:`gateway.validate`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import Any
from urllib.parse import quote

from fedcore.errors import reasons_of
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge, Unavailable
from gateway.feedback_token import HEADER_BYTES as TOKEN_HEADER
from gateway.fleet import Edge
from gateway.guard import check_request, repeated_header
from gateway.metrics import UNKNOWN
from gateway.request_ids import generated_id, request_id
from gateway.routing import parse_version
from gateway.state import GatewayState
from gateway.upstream import FORWARD_HEADER_BYTES, RetryReason, UpstreamError, UpstreamResponse
from gateway.validate import (
    check_depth,
    check_framing,
    decode_body,
    explain,
    is_triton_parse_error,
    parse_count,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
RETRY_REASONS = reasons_of(RetryReason)
EXPLAINED_STATUSES = frozenset({400, 500})


def split_infer_path(path: str) -> tuple[str, str | None] | None:
    """``(model, version or None)`` for an infer path, None for any other path."""
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer":
        model, version = parts[3], None
    elif len(parts) == 7 and parts[4] == "versions" and parts[6] == "infer":
        model, version = parts[3], parts[5]
    else:
        return None
    if parts[1] != "v2" or parts[2] != "models" or not model:
        return None
    return model, version


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_message(body: bytes) -> str:
    """The ``error`` of a Triton error body, or the body itself."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
    return str(doc.get("error", "")) if isinstance(doc, dict) else str(doc)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


@dataclass(slots=True)
class _Request:
    authorization: bytes | None
    content_length: bytes | None
    header_length: bytes | None
    encoding: bytes | None
    forward: list[tuple[bytes, bytes]]
    prefer: str | None = None
    key: str = ""  # the name of the key that made the request


KEY_HEADER = b"x-fedgate-key"
"""Header the gateway adds to every request it forwards: the name of the key that made it.
The edge's Triton hands it to ``model.py`` as a request parameter, which captures the
request's id as ``<key name>/<id>``: a label binds to the key, and another key's
request with the same id is another sample (a client's own header of that name is never
forwarded: only :data:`gateway.upstream.FORWARD_HEADERS` are)."""

PREFER_EDGE = b"x-fedgate-prefer-edge"
"""Request header naming the edge a client would like to be served by, when it can."""


def _scan(headers: list[tuple[bytes, bytes]]) -> _Request:
    req = _Request(None, None, None, None, [])
    for name, value in headers:
        if name == b"authorization":
            req.authorization = value
        elif name == PREFER_EDGE:
            req.prefer = value.decode("latin-1")
        elif name == b"content-length":
            req.content_length = value
        elif name in FORWARD_HEADER_BYTES:
            req.forward.append((name, value))
            if name == b"inference-header-content-length":
                req.header_length = value
            elif name == b"content-encoding":
                req.encoding = value
    return req


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body, or :class:`PayloadTooLarge` as soon as it exceeds ``limit``."""
    if declared is not None:
        size = parse_count(declared)
        if size is None or size > limit:
            shown = declared[:40].decode("latin-1")
            raise PayloadTooLarge(f"request body of {shown} bytes exceeds the limit of {limit}")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if message["type"] == "http.disconnect":
            raise ClientGone
        return body
    chunks, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass(slots=True)
class _Outcome:
    """What the metrics record of one request; labels only from the fleet."""

    model: str = ""
    version: str = ""
    edge: str = ""
    status: int = 500
    started: bool = False  # the response has begun: no error answer can follow


BodyReader = Callable[[bytes | None, int], Awaitable[bytes]]
"""Reads the request body given its declared Content-Length and the limit (413 beyond)."""
Responder = Callable[[int, bytes, list[tuple[bytes, bytes]]], Awaitable[None]]
"""Sends status, body and headers (``content-length`` is added by the responder)."""


@dataclass(slots=True)
class _Checked:
    """A request's body as checked and forwarded (decoded), and its JSON header's length."""

    body: bytes
    header_length: int | None
    forward: list[tuple[bytes, bytes]]


class InferPlane:
    """The infer route, behind two entrances: ASGI (``__call__``) and :mod:`gateway.fastpath`."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._paths: dict[tuple[str, int], bytes] = {}

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, target: tuple[str, str | None]
    ) -> None:
        await self.serve(
            target, scope["headers"], partial(read_body, receive), partial(respond, send)
        )

    def precheck(self, headers: list[tuple[bytes, bytes]]) -> _Request:
        """Key, role, rate and repeated framing headers: all that needs no body (4xx)."""
        req = _scan(headers)
        req.key = self.state.admit(req.authorization, "infer").name
        req.forward.append((KEY_HEADER, req.key.encode()))
        repeated = repeated_header(headers)
        if repeated is not None:
            raise BadRequest(f"the request repeats the {repeated} header: send it once")
        return req

    async def serve(
        self,
        target: tuple[str, str | None],
        headers: list[tuple[bytes, bytes]],
        read: BodyReader,
        reply: Responder,
        pre: _Request | GatewayError | None = None,
    ) -> None:
        """Answer one infer request for ``target`` (model, raw version or None).

        ``pre`` is :meth:`precheck`'s result when the caller already had it (the fast path
        checks before it buffers a body); the request is checked here otherwise.
        """
        start = perf_counter()
        out = _Outcome()
        try:
            if isinstance(pre, GatewayError):
                raise pre
            await self._serve(target, pre or self.precheck(headers), read, reply, out)
        except GatewayError as exc:
            out.status = exc.status
            extra = [(b"content-type", JSON)]
            extra += [(k.encode(), v.encode()) for k, v in exc.headers().items()]
            await reply(exc.status, error_body(exc.message), extra)
        except ClientGone:
            out.status = 499
        except Exception:
            log.exception(
                "inference request failed inside the gateway",
                extra={"request_id": generated_id(), "model": target[0]},
            )
            out.status = 500
            if not out.started:
                await reply(
                    500, error_body("internal error in the gateway"), [(b"content-type", JSON)]
                )
        finally:
            model = out.model or (target[0] if self.state.fleet.knows(target[0]) else UNKNOWN)
            seconds = perf_counter() - start
            self.state.metrics.stats.observe(model, out.version, out.edge, out.status, seconds)

    async def _serve(
        self,
        target: tuple[str, str | None],
        req: _Request,
        read: BodyReader,
        reply: Responder,
        out: _Outcome,
    ) -> None:
        state = self.state
        model, raw_version = target
        version = parse_version(raw_version)
        body = await read(req.content_length, state.settings.max_body_bytes)
        checked = self._early_check(req, body)
        inflight = state.metrics.stats.inflight
        try:
            edge, served, resp = await self._forward(model, version, req, checked, out)
            if resp.status in EXPLAINED_STATUSES:
                resp = await self._explain(resp, model, served, edge, checked)
            out.status = resp.status
            out.started = True
            headers = [
                *resp.headers,
                (b"x-fedgate-edge", edge.edge_id.encode()),
                (b"x-fedgate-model-version", out.version.encode()),
            ]
            if state.tokens is not None and resp.status == 200:
                token = state.tokens.mint(model, edge.edge_id, req.key)
                headers.append((TOKEN_HEADER, token))
            await reply(resp.status, resp.body, headers)
        finally:
            if out.model:  # counted in flight once routed
                inflight[model] -= 1

    def _early_check(self, req: _Request, body: bytes) -> _Checked:
        """Binary framing and JSON depth (400 if wrong); an encoded body is decoded here
        (bounded) and forwarded decoded, so that the edge parses exactly what was checked."""
        problem = check_framing(req.header_length, len(body), req.encoding is not None)
        forward = req.forward
        if problem is None and req.encoding is not None:  # rare
            try:
                body = decode_body(
                    body, req.encoding.decode("latin-1"), self.state.settings.max_body_bytes
                )
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            forward = [(k, v) for k, v in forward if k != b"content-encoding"]
            problem = check_framing(req.header_length, len(body), False)
        header_length = parse_count(req.header_length) if req.header_length else None
        if problem is None:
            problem = check_depth(body, len(body) if header_length is None else header_length)
        if problem is not None:
            raise BadRequest(problem)
        return _Checked(body, header_length, forward)

    async def _guard(self, model: str, version: int, edge: Edge, checked: _Checked) -> None:
        """The request against the model's schema (400), fetched from ``edge`` when new."""
        schemas = self.state.schemas
        schema = schemas.peek(model, version) or await schemas.get(model, version, edge.url)
        if schema is None:
            raise UpstreamError("protocol", f"no model metadata for version {version}")
        problem = check_request(checked.body, checked.header_length, schema)
        if problem is not None:
            raise BadRequest(problem)

    def _path(self, model: str, version: int) -> bytes:
        path = self._paths.get((model, version))
        if path is None:
            if len(self._paths) > 1024:
                self._paths.clear()
            path = f"/v2/models/{quote(model, safe='')}/versions/{version}/infer".encode()
            self._paths[(model, version)] = path
        return path

    async def _forward(
        self, model: str, version: int | None, req: _Request, checked: _Checked, out: _Outcome
    ) -> tuple[Edge, int, UpstreamResponse]:
        """Send to the chosen edge; on a connection error, 503 or 404 retry once elsewhere.

        When no edge answers otherwise, the last edge's own 503/404 is relayed.
        """
        state = self.state
        body = checked.body
        tried: list[str] = []
        refused: tuple[Edge, int, UpstreamResponse] | None = None
        last = reason = ""
        rid: str | None = None  # the request's id, found only when something goes wrong
        for attempt in range(2):
            try:
                prefer = req.prefer if attempt == 0 else None
                edge, served = state.router.route(model, version, tried, prefer)
            except GatewayError:
                if refused is not None:
                    return refused
                if not tried:
                    raise
                self._note(logging.WARNING, "no edge could serve", model, req, body, rid, last)
                raise Unavailable(f"no edge could serve model '{model}': {last}") from None
            if attempt == 0:
                out.model = model
                inflight = state.metrics.stats.inflight
                inflight[model] = inflight.get(model, 0) + 1
            else:
                state.metrics.retries.labels(model, reason).inc()
                rid = self._note(logging.INFO, "retrying", model, req, body, rid, last)
            out.edge, out.version = edge.edge_id, str(served)
            tried.append(edge.edge_id)
            edge.outstanding += 1
            try:
                await self._guard(model, served, edge, checked)
                resp = await state.upstream.send(
                    edge.url, b"POST", self._path(model, served), checked.forward, body
                )
            except UpstreamError as exc:
                last, reason = f"edge {edge.edge_id}: {exc.message}", exc.reason
                state.fleet.record_failure(edge)
                if exc.reason not in RETRY_REASONS:
                    self._note(logging.WARNING, "failed", model, req, body, rid, last)
                    raise GatewayError(last, 504 if exc.reason == "timeout" else 502) from None
                continue
            finally:
                edge.outstanding -= 1
            if resp.status not in (503, 404):
                state.fleet.record_success(edge)
                return edge, served, resp
            if resp.status == 503:
                state.fleet.record_failure(edge)
            refused, reason = (edge, served, resp), str(resp.status)
            last = f"edge {edge.edge_id} answered {resp.status}: {error_message(resp.body)}"
        if refused is not None:
            return refused
        self._note(logging.WARNING, "no edge could serve", model, req, body, rid, last)
        raise Unavailable(f"no edge could serve model '{model}': {last}")

    @staticmethod
    def _note(
        level: int, what: str, model: str, req: _Request, body: bytes, rid: str | None, why: str
    ) -> str:
        """Log a retried or failed request with its id (found once, then reused)."""
        rid = rid or request_id(body, req.header_length)
        log.log(
            level,
            "inference request %s: %s",
            what,
            why,
            extra={"request_id": rid, "model": model},
        )
        return rid

    async def _explain(
        self, resp: UpstreamResponse, model: str, version: int, edge: Edge, checked: _Checked
    ) -> UpstreamResponse:
        """Turn an edge's refusal into a 400 naming what is wrong, when it can be found."""
        schema = await self.state.schemas.get(model, version, edge.url)
        if schema is not None:
            problem = explain(checked.body, checked.header_length, schema)
            if problem:
                return _bad_request(problem)
        if resp.status == 500 and is_triton_parse_error(error_message(resp.body)):
            return UpstreamResponse(400, resp.body, resp.headers)
        return resp


def _bad_request(message: str) -> UpstreamResponse:
    return UpstreamResponse(400, error_body(message), [(b"content-type", JSON)])
