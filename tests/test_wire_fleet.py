"""Heartbeat wire format and the gateway's fleet registry (pure, no broker)."""

from __future__ import annotations

import pytest

from fedcore.wire import Heartbeat, ModelState, WireError, decode_heartbeat
from gateway.fleet import Fleet


def beat(
    edge: str, ready: list[int], seq: int = 1, url: str = "http://127.0.0.1:9000"
) -> Heartbeat:
    return Heartbeat(
        edge_id=edge, url=url, seq=seq, ts=1.0, models={"digits": ModelState(ready=ready)}
    )


def test_heartbeat_round_trip() -> None:
    b = beat("edge-1", [1, 2])
    assert decode_heartbeat(b.encode()) == b


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"not json", "<root>"),
        (b'{"edge_id":"Edge 1","url":"http://a:1","seq":1,"ts":1,"models":{}}', "edge_id"),
        (b'{"edge_id":"e1","url":"ftp://a","seq":1,"ts":1,"models":{}}', "url"),
        (b'{"edge_id":"e1","url":"http://a:1","seq":-1,"ts":1,"models":{}}', "seq"),
        (b'{"edge_id":"e1","url":"http://a:1","seq":1,"ts":1,"models":{},"x":1}', "x"),
    ],
)
def test_malformed_heartbeats_name_the_field(payload: bytes, where: str) -> None:
    with pytest.raises(WireError) as info:
        decode_heartbeat(payload)
    assert info.value.message_type == "Heartbeat"
    assert info.value.detail.startswith(where)


def test_fleet_prefers_least_outstanding_and_filters_versions() -> None:
    now = [0.0]
    fleet = Fleet(ttl=3.0, clock=lambda: now[0])
    fleet.observe(beat("edge-1", [1]))
    fleet.observe(beat("edge-2", [1, 2], url="http://127.0.0.1:9001"))
    fleet.edges["edge-1"].outstanding = 3
    chosen = fleet.choose("digits", None)
    assert chosen is not None and chosen.edge_id == "edge-2"
    assert fleet.choose("digits", 1, exclude=["edge-2"]).edge_id == "edge-1"  # type: ignore[union-attr]
    assert [e.edge_id for e in fleet.serving("digits", 2)] == ["edge-2"]
    assert fleet.choose("digits", 3) is None
    assert fleet.choose("other", None) is None and not fleet.knows("other")


def test_fleet_expires_silent_edges_and_honours_leave() -> None:
    now = [0.0]
    fleet = Fleet(ttl=3.0, clock=lambda: now[0])
    fleet.observe(beat("edge-1", [1]))
    fleet.observe(beat("edge-2", [1], url="http://127.0.0.1:9001"))
    now[0] = 2.0
    fleet.observe(beat("edge-2", [1], seq=2, url="http://127.0.0.1:9001"))
    now[0] = 4.0
    assert [e.edge_id for e in fleet.fresh()] == ["edge-2"]
    fleet.leave("edge-2")
    assert fleet.fresh() == []
