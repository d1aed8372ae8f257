"""The gateway's app factory: settings in, FastAPI app out; no import-time side effects."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from fedcore import subjects
from fedcore.wire import WireError, decode_heartbeat
from gateway.errors import GatewayError
from gateway.fleet import Fleet
from gateway.routes import fleet_api, oip
from gateway.settings import GatewaySettings
from gateway.state import GatewayState
from gateway.upstream import Upstream

log = logging.getLogger(__name__)


async def _subscribe_fleet(nc: NATS, fleet: Fleet) -> None:
    async def on_heartbeat(msg: Msg) -> None:
        try:
            fleet.observe(decode_heartbeat(msg.data))
        except WireError as exc:
            log.warning("dropped heartbeat: %s", exc, extra={"subject": msg.subject})

    async def on_leave(msg: Msg) -> None:
        fleet.leave(msg.subject.rsplit(".", 1)[-1])

    await nc.subscribe(subjects.HEARTBEAT_ALL, cb=on_heartbeat)
    await nc.subscribe(subjects.LEAVE_ALL, cb=on_leave)


def create_app(
    settings: GatewaySettings, *, fleet: Fleet | None = None, bus: bool = True
) -> FastAPI:
    """Build the gateway. ``fleet`` and ``bus=False`` let tests inject the fleet directly."""
    state = GatewayState(
        settings=settings,
        fleet=fleet or Fleet(ttl=settings.heartbeat_ttl_s),
        upstream=Upstream(settings.upstream_timeout_s),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.upstream.open()
        nc: NATS | None = None
        if bus:
            nc = await nats.connect(
                servers=settings.nats_url.split(","),
                user=settings.nats_user,
                password=settings.nats_password(),
                name="gateway",
                max_reconnect_attempts=-1,
            )
            await _subscribe_fleet(nc, state.fleet)
        log.info("gateway listening", extra={"host": settings.host, "port": settings.port})
        try:
            yield
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.drain()
            await state.upstream.close()

    app = FastAPI(title="fedgate gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state
    app.include_router(oip.router)
    app.include_router(fleet_api.router)

    @app.exception_handler(GatewayError)
    async def on_gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    return app
