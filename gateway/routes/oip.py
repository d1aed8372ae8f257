"""Open Inference Protocol v2 (KServe v2) over HTTP: health, server and model metadata.

Inference itself (``POST .../infer``) is the raw-ASGI data plane in :mod:`gateway.dataplane`;
these routes are the rest of the protocol. Health is open to probes without a key; the
others need a key of role ``infer`` (or ``admin``).
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Response

from fedcore.version import package_version
from gateway.errors import GatewayError, Unavailable
from gateway.fleet import Edge
from gateway.routing import parse_version
from gateway.state import GatewayState, InferKey, State
from gateway.upstream import UpstreamError, UpstreamResponse

router = APIRouter(tags=["inference"])

SERVER_NAME = "fedgate"
SERVER_VERSION = package_version()
EXTENSIONS = ["binary_tensor_data"]


def _choose(state: GatewayState, model: str, version: int | None, tried: list[str]) -> Edge:
    if version is not None:
        return state.router.route(model, version, tried)[0]
    edge = state.fleet.choose(model, None, tried)
    if edge is None:
        raise state.router.not_served(model, None)
    return edge


async def relay_get(
    state: GatewayState, model: str, version: int | None, suffix: str = ""
) -> Response:
    """GET ``/v2/models/{model}[/versions/{v}]{suffix}`` from an edge serving it; one retry."""
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{version}"
    tried: list[str] = []
    last = ""
    for _ in range(2):
        try:
            edge = _choose(state, model, version, tried)
        except GatewayError:
            if not tried:
                raise
            break
        tried.append(edge.edge_id)
        try:
            resp = await state.upstream.send(edge.url, b"GET", (path + suffix).encode(), [], b"")
        except UpstreamError as exc:
            state.fleet.record_failure(edge)
            last = f"edge {edge.edge_id}: {exc.message}"
            continue
        if resp.status == 503:
            last = f"edge {edge.edge_id} answered 503"
            continue
        return _relay(edge, version, resp)
    raise Unavailable(f"no edge could answer for model '{model}': {last}")


def _relay(edge: Edge, version: int | None, resp: UpstreamResponse) -> Response:
    headers = resp.str_headers()
    headers["x-fedgate-edge"] = edge.edge_id
    if version is not None:
        headers["x-fedgate-model-version"] = str(version)
    media = headers.pop("content-type", "application/json")
    return Response(content=resp.body, status_code=resp.status, headers=headers, media_type=media)


@router.get("/v2/health/live")
async def live() -> Response:
    """200 while the gateway process serves."""
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(state: State) -> Response:
    """200 when at least one admitted edge has a model ready, else 400."""
    serving = any(
        not e.ejected and any(s.ready for s in e.models.values()) for e in state.fleet.fresh()
    )
    return Response(status_code=200 if serving else 400)


@router.get("/v2")
async def server_metadata(_: InferKey) -> dict[str, object]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(
    state: State, _: InferKey, model: str, version: str | None = None
) -> Response:
    """200 when an admitted edge has the model (version) ready, else 400."""
    ok = bool(state.fleet.serving(model, parse_version(version)))
    return Response(status_code=200 if ok else 400)


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(
    state: State, _: InferKey, model: str, version: str | None = None
) -> Response:
    """Triton's model metadata, from an edge serving the model (version)."""
    return await relay_get(state, model, parse_version(version))


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def model_config(
    state: State, _: InferKey, model: str, version: str | None = None
) -> Response:
    """Triton's model configuration, from an edge serving the model (version)."""
    return await relay_get(state, model, parse_version(version), "/config")
