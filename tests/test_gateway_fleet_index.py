"""Routing looks only at the edges that list the request's model (issue #17, item 4: with
1,000 edges in the fleet, every request scanned all of them), and the per-model index
follows heartbeats that change an edge's models, leaves, expiries and new URLs."""

from __future__ import annotations

from typing import Any

from fedcore.wire import Heartbeat, ModelState
from gateway.fleet import Fleet


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def beat(edge: str, models: dict[str, list[int]], port: int = 9000) -> Heartbeat:
    return Heartbeat(
        edge_id=edge,
        url=f"http://127.0.0.1:{port}",
        seq=1,
        ts=0.0,
        models={m: ModelState(ready=v) for m, v in models.items()},
    )


class Touched(dict[str, Any]):
    """A model map that records each look-up."""

    looked = 0

    def get(self, key: str, default: Any = None) -> Any:
        Touched.looked += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        Touched.looked += 1
        return super().__getitem__(key)


def test_a_request_looks_only_at_the_edges_of_its_model() -> None:
    fleet = Fleet(ttl=10, clock=Clock())
    fleet.observe(beat("edge-1", {"digits": [1, 2]}))
    for i in range(1000):
        fleet.observe(beat(f"sim-{i}", {"wide": [1]}, 20000 + i))
        edge = fleet.edges[f"sim-{i}"]
        edge.models = Touched(edge.models)
    Touched.looked = 0
    found = fleet.choose_newest("digits")
    assert found is not None and found[0].edge_id == "edge-1" and found[1] == 2
    chosen = fleet.choose("digits", 1)
    assert chosen is not None and chosen.edge_id == "edge-1"
    assert Touched.looked == 0  # before: both looked at all 1,000 other edges
    assert fleet.choose("wide", 1) is not None


def test_the_index_follows_the_fleet() -> None:
    clock = Clock()
    fleet = Fleet(ttl=10, clock=clock)
    fleet.observe(beat("a", {"digits": [1]}, 9001))
    fleet.observe(beat("b", {"wide": [1]}, 9002))
    assert fleet.choose_newest("digits") is not None
    fleet.observe(beat("a", {"wide": [1]}, 9001))  # a stopped serving digits
    assert fleet.choose_newest("digits") is None
    assert {e.edge_id for e in fleet.by_model["wide"].values()} == {"a", "b"}
    fleet.observe(beat("a", {"digits": [3], "wide": [1]}, 9001))
    assert fleet.choose_newest("digits") == (fleet.edges["a"], 3)
    fleet.observe(beat("a", {"digits": [3]}, 9005))  # a new URL: a new edge object
    chosen = fleet.choose("digits", 3)
    assert chosen is not None and chosen.url == "http://127.0.0.1:9005"
    assert set(fleet.by_model["wide"]) == {"b"}
    fleet.leave("a")
    assert fleet.choose_newest("digits") is None and "digits" not in fleet.by_model
    clock.now = 11.0  # b expires
    assert fleet.fresh() == []
    assert fleet.by_model == {} and fleet.choose("wide", 1) is None
