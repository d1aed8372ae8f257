"""Open Inference Protocol v2 (KServe v2) over HTTP, served from the fleet's edges."""

from __future__ import annotations

import logging

import aiohttp
from fastapi import APIRouter, Request, Response

from gateway.errors import NotFound, PayloadTooLarge, Unavailable
from gateway.fleet import Edge
from gateway.state import GatewayState, State
from gateway.upstream import FORWARD_HEADERS, UpstreamResponse

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])

SERVER_NAME = "fedgate"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
RETRY_STATUSES = {502, 503, 504}


def _version(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise NotFound(f"Request for unknown model: version {raw!r} is not a positive integer")
    return int(raw)


def _not_served(state: GatewayState, model: str, version: int | None) -> Exception:
    if not state.fleet.knows(model):
        return NotFound(f"Request for unknown model: '{model}' is not found")
    if version is not None and not any(
        version in e.ready_versions(model) for e in state.fleet.fresh()
    ):
        return NotFound(f"Request for unknown model: '{model}' version {version} is not found")
    return Unavailable(f"no ready edge serves model '{model}'")


async def _forward(
    state: GatewayState,
    model: str,
    version: int | None,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> tuple[Edge, UpstreamResponse]:
    """Send to the least-loaded edge serving the model; retry once on another edge."""
    tried: list[str] = []
    last_error = ""
    for _ in range(2):
        edge = state.fleet.choose(model, version, exclude=tried)
        if edge is None:
            break
        tried.append(edge.edge_id)
        edge.outstanding += 1
        try:
            resp = await state.upstream.request(method, edge.url + path, body, headers)
        except aiohttp.ClientError as exc:
            last_error = f"edge {edge.edge_id}: {type(exc).__name__}"
            log.warning("upstream failed, retrying elsewhere: %s", last_error)
            continue
        finally:
            edge.outstanding -= 1
        if resp.status in RETRY_STATUSES:
            last_error = f"edge {edge.edge_id} answered {resp.status}"
            continue
        edge.served += 1
        return edge, resp
    if not tried:
        raise _not_served(state, model, version)
    raise Unavailable(f"no edge could serve model '{model}': {last_error}")


def _relay(edge: Edge, model: str, version: int | None, resp: UpstreamResponse) -> Response:
    served = version if version is not None else max(edge.ready_versions(model), default=0)
    headers = dict(resp.headers)
    headers["x-fedgate-edge"] = edge.edge_id
    headers["x-fedgate-model-version"] = str(served)
    media = headers.pop("content-type", "application/json")
    return Response(content=resp.body, status_code=resp.status, headers=headers, media_type=media)


@router.get("/v2/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(state: State) -> Response:
    serving = any(any(e.models[m].ready for m in e.models) for e in state.fleet.fresh())
    return Response(status_code=200 if serving else 400)


@router.get("/v2")
async def server_metadata() -> dict[str, object]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(state: State, model: str, version: str | None = None) -> Response:
    ok = bool(state.fleet.serving(model, _version(version)))
    return Response(status_code=200 if ok else 400)


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(
    state: State, request: Request, model: str, version: str | None = None
) -> Response:
    v = _version(version)
    edge, resp = await _forward(state, model, v, "GET", request.url.path, None, {})
    return _relay(edge, model, v, resp)


@router.post("/v2/models/{model}/infer")
@router.post("/v2/models/{model}/versions/{version}/infer")
async def infer(state: State, request: Request, model: str, version: str | None = None) -> Response:
    v = _version(version)
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds the limit of {limit}")
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_HEADERS}
    edge, resp = await _forward(state, model, v, "POST", request.url.path, body, headers)
    return _relay(edge, model, v, resp)
