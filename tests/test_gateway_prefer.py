"""A client may ask for its site's edge (``x-fedgate-prefer-edge``); routing honours it
only when that edge can serve the request."""

from __future__ import annotations

from gateway.dataplane import _scan
from gateway.routing import Router
from tests.test_gateway_units import beat, fleet_of


def test_preferred_edge_is_used_when_it_can_serve() -> None:
    now = [0.0]
    fleet = fleet_of(
        now, beat("edge-1", [1], 9001), beat("edge-2", [1], 9002), beat("edge-3", [2], 9003)
    )
    fleet.edges["edge-1"].outstanding = 9  # least-outstanding alone would avoid edge-1
    router = Router(fleet)
    assert router.route("digits", 1, prefer="edge-1")[0].edge_id == "edge-1"
    # edge-3 does not serve version 1: normal routing takes over
    assert router.route("digits", 1, prefer="edge-3")[0].edge_id == "edge-2"
    # unknown or excluded (retry) preference: ignored
    assert router.route("digits", 1, prefer="edge-9")[0].edge_id == "edge-2"
    assert router.route("digits", 1, exclude=["edge-1"], prefer="edge-1")[0].edge_id == "edge-2"


def test_the_header_is_read_once_in_the_scan() -> None:
    req = _scan([(b"x-fedgate-prefer-edge", b"edge-2"), (b"content-type", b"application/json")])
    assert req.prefer == "edge-2"
    assert _scan([]).prefer is None
