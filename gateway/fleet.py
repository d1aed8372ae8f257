"""The fleet as the gateway sees it: edges from heartbeats, expiring when they fall silent.

Choosing an edge: among fresh edges that report the model (and version) ready, the one
with the fewest requests outstanding from this gateway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fedcore.wire import Heartbeat, ModelState


@dataclass
class Edge:
    """One edge: where it is, what it serves, how busy this gateway keeps it."""

    edge_id: str
    url: str
    models: dict[str, ModelState]
    last_seen: float
    device: str = "cpu"
    outstanding: int = 0
    served: int = 0

    def ready_versions(self, model: str) -> list[int]:
        state = self.models.get(model)
        return sorted(state.ready) if state else []


@dataclass
class Fleet:
    """Edges keyed by id; ``ttl`` seconds without a heartbeat and an edge is gone."""

    ttl: float
    clock: Callable[[], float] = time.monotonic
    edges: dict[str, Edge] = field(default_factory=dict)

    def observe(self, beat: Heartbeat) -> None:
        now = self.clock()
        edge = self.edges.get(beat.edge_id)
        if edge is None or edge.url != beat.url:
            self.edges[beat.edge_id] = Edge(beat.edge_id, beat.url, beat.models, now, beat.device)
            return
        edge.models = beat.models
        edge.last_seen = now
        edge.device = beat.device

    def leave(self, edge_id: str) -> None:
        self.edges.pop(edge_id, None)

    def fresh(self) -> list[Edge]:
        """Edges heard from within ``ttl``; expired ones are dropped."""
        now = self.clock()
        for edge_id in [e.edge_id for e in self.edges.values() if now - e.last_seen > self.ttl]:
            del self.edges[edge_id]
        return list(self.edges.values())

    def knows(self, model: str) -> bool:
        return any(model in e.models for e in self.fresh())

    def serving(self, model: str, version: int | None) -> list[Edge]:
        """Fresh edges with ``model`` ready (at ``version`` when given)."""
        out = []
        for edge in self.fresh():
            versions = edge.ready_versions(model)
            if versions and (version is None or version in versions):
                out.append(edge)
        return out

    def choose(self, model: str, version: int | None, exclude: Iterable[str] = ()) -> Edge | None:
        """Least outstanding requests among the edges serving ``model``/``version``."""
        skip = set(exclude)
        candidates = [e for e in self.serving(model, version) if e.edge_id not in skip]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (e.outstanding, e.served))
