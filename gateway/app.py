"""The gateway's app factory: settings in, ASGI app out; no import-time side effects.

One process, one data plane: :class:`GatewayApp` hands ``POST .../infer`` to the raw-ASGI
:class:`gateway.dataplane.InferPlane` and every other request to the FastAPI app, which
also owns the lifespan (NATS subscription, ejection probes, upstream pools).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from starlette.exceptions import HTTPException

from fedcore.loops import Backoff
from fedcore.nats_client import close_service, connect_service
from fedcore.version import package_version
from gateway.auth import KeyRing, RateLimiter
from gateway.dataplane import InferPlane, Receive, Scope, Send, split_infer_path
from gateway.errors import GatewayError
from gateway.feedback_token import load_tokens
from gateway.fleet import Edge, Fleet
from gateway.fleet_feed import FleetFeed
from gateway.limits import within_limit
from gateway.metrics import GatewayMetrics
from gateway.openapi import document_infer
from gateway.rollout_control import RolloutController
from gateway.routes import (
    dashboard,
    feedback,
    fleet_api,
    health,
    history,
    metrics_api,
    oip,
    rollouts,
    routing_api,
)
from gateway.routing import Router
from gateway.schemas import SchemaCache
from gateway.settings import GatewaySettings
from gateway.state import GatewayState
from gateway.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

DEV_MODE_WARNING = (
    "DEVELOPMENT MODE: the gateway accepts every request WITHOUT an API key, with admin "
    "rights. Never expose it like this; set FEDGATE_GATEWAY_API_KEYS_FILE instead."
)


class GatewayApp:
    """The ASGI app uvicorn serves."""

    def __init__(self, api: FastAPI, state: GatewayState) -> None:
        self.api = api
        self.state = state
        self.plane = InferPlane(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = split_infer_path(scope["path"])
            if target is not None:
                await self.plane(scope, receive, send, target)
                return
        await within_limit(self.api, scope, receive, send)


async def _probe(state: GatewayState, edge: Edge) -> None:
    try:
        resp = await state.upstream.send(edge.url, b"GET", b"/v2/health/ready", [], b"")
        healthy = resp.status == 200
    except UpstreamError:
        healthy = False
    state.fleet.probed(edge, healthy)
    if healthy:
        state.metrics.readmissions.labels(edge.edge_id).inc()
        log.info("edge %s re-admitted after a good probe", edge.edge_id)


async def _probe_loop(state: GatewayState) -> None:
    """Probe ejected edges whose time out is over; re-admit the healthy ones. Also drops
    the metric series of versions retired for :data:`RETIRED_SERIES_S`."""
    tasks: set[asyncio.Task[None]] = set()
    while True:
        for edge in state.fleet.due_for_probe():
            edge.probing = True
            task = asyncio.create_task(_probe(state, edge))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        retire_series(state, time.monotonic())
        await asyncio.sleep(state.settings.probe_interval_s)


RETIRED_SERIES_S = 600.0
"""How long a version is served by no fresh edge and no split before its series go."""


def retire_series(state: GatewayState, now: float, grace_s: float = RETIRED_SERIES_S) -> None:
    live = state.fleet.live_versions()
    for model, split in state.router.splits.items():
        live.update((model, str(v)) for v in (split.stable, split.candidate) if v is not None)
    state.metrics.stats.retire(live, now, grace_s)


def _edge_gone(state: GatewayState, edge: Edge) -> None:
    """An edge left (or moved): drop its upstream pool, and its series once it is gone."""
    if all(e.url != edge.url for e in state.fleet.edges.values()):
        state.upstream.forget(edge.url)
    if edge.edge_id not in state.fleet.edges:
        state.metrics.forget_edge(edge.edge_id)


def build_state(settings: GatewaySettings, fleet: Fleet | None = None) -> GatewayState:
    """The shared state, with keys loaded (raises ``ConfigError`` without keys or dev mode)."""
    keys = KeyRing.load(settings.api_keys_file, settings.api_keys, settings.dev_mode)
    if keys.dev_mode:
        log.warning(DEV_MODE_WARNING)
    metrics = GatewayMetrics()
    fleet = fleet or Fleet(ttl=settings.heartbeat_ttl_s)
    fleet.eject_after = settings.eject_after_failures
    fleet.eject_base_s = settings.eject_base_s
    fleet.eject_max_s = settings.eject_max_s

    def on_eject(edge: Edge) -> None:
        metrics.ejections.labels(edge.edge_id).inc()
        log.warning(
            "edge %s ejected after %d failures in a row",
            edge.edge_id,
            edge.failures,
            extra={"edge": edge.edge_id},
        )

    fleet.on_eject = on_eject
    upstream = Upstream(settings.upstream_timeout_s, settings.upstream_connect_timeout_s)
    state = GatewayState(
        settings=settings,
        fleet=fleet,
        upstream=upstream,
        router=Router(fleet),
        keys=keys,
        limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst_s),
        metrics=metrics,
        schemas=SchemaCache(upstream),
        tokens=load_tokens(settings.feedback_secret_file),
    )
    fleet.on_leave = lambda edge: _edge_gone(state, edge)
    return state


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def on_gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers())

    @app.exception_handler(NatsError)
    async def on_bus_error(_: Request, exc: NatsError) -> JSONResponse:
        # a NATS node failing over times requests out: the caller may retry, not a fault here
        log.warning("NATS request failed: %r", exc)
        return JSONResponse(
            {"error": f"the NATS bus did not answer ({type(exc).__name__}); try again"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


async def _bind_rollouts(controller: RolloutController, nc: NATS, replicas: int) -> None:
    """Bind the rollout controller before serving, retrying JetStream for up to a minute
    (a cluster still electing leaders times requests out); then the error stops start-up."""
    backoff = Backoff(0.5, 5.0)
    deadline = time.monotonic() + 60.0
    while True:
        try:
            await controller.bind(nc.jetstream(timeout=10.0), replicas)
            return
        except (NatsError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("rollout buckets not reachable yet (%r); retrying", exc)
            await asyncio.sleep(backoff.next())


def create_app(
    settings: GatewaySettings, *, fleet: Fleet | None = None, bus: bool = True
) -> GatewayApp:
    """Build the gateway. ``fleet`` and ``bus=False`` let tests inject the fleet directly."""
    state = build_state(settings, fleet)
    relay = feedback.FeedbackRelay()
    controller = RolloutController(
        state, instance=settings.instance_id, lease_ttl_s=settings.rollout_lease_ttl_s
    )
    reader = history.HistoryReader()
    feed = FleetFeed(state.fleet, state.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.upstream.open()
        nc: NATS | None = None
        if bus:
            nc = await connect_service(settings, "gateway")
            await feed.start(nc)
            relay.bind(nc)
            # applies recorded splits first (retried: a young cluster answers slowly)
            await _bind_rollouts(controller, nc, settings.nats_replicas)
            reader.bind(nc)
        prober = asyncio.create_task(_probe_loop(state))
        log.info("gateway listening", extra={"host": settings.host, "port": settings.port})
        api.state.serving = True
        try:
            yield
        finally:
            api.state.serving = False
            await controller.close()
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            if nc is not None:
                await feed.close()
                await close_service(nc)
            await state.upstream.close()

    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN, which
    # would run a third party's script on the dashboard's origin. /openapi.json stays.
    api = FastAPI(
        title="fedgate gateway",
        version=package_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    api.state.gateway = state
    api.state.feedback = relay
    api.state.rollouts = controller
    api.state.history = reader
    for module in (oip, health, fleet_api, routing_api, metrics_api, feedback, history, dashboard):
        api.include_router(module.router)
    api.include_router(rollouts.router)
    _error_handlers(api)
    document_infer(api)
    return GatewayApp(api, state)
