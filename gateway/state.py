"""What the gateway's routes share, and the ``Annotated`` dependency that hands it out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gateway.fleet import Fleet
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream


@dataclass
class GatewayState:
    settings: GatewaySettings
    fleet: Fleet
    upstream: Upstream


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(_state)]
