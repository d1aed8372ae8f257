"""The fleet as the gateway sees it: edges from heartbeats, expiring when they fall silent.

Choosing an edge: among fresh, admitted edges that report the model (and version) ready,
the one with the fewest requests outstanding from this gateway (ties: the fewer requests
pending in its Triton by its last heartbeat, then the fewer served).

Outlier ejection: ``eject_after`` consecutive failures (connection errors, 503s) eject an
edge for ``eject_base_s``, doubling on each ejection without a served request in between,
up to ``eject_max_s``. When
that time is up the gateway probes it (``/v2/health/ready``) and re-admits it on success;
a failed probe ejects it again. Heartbeats alone never re-admit an ejected edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fedcore.wire import Heartbeat, ModelState
from gateway.settings import gateway_default


@dataclass(slots=True)
class Edge:
    """One edge: where it is, what it serves, how busy and how healthy it is."""

    edge_id: str
    url: str
    models: dict[str, ModelState]
    last_seen: float
    device: str = "cpu"
    outstanding: int = 0  # requests from this gateway now in flight to it
    served: int = 0
    pending: int = 0  # requests pending in its Triton, from its last heartbeat
    failures: int = 0  # consecutive
    ejected_until: float | None = None  # None: admitted
    ejections_in_a_row: int = 0
    probing: bool = False

    def ready_versions(self, model: str) -> list[int]:
        state = self.models.get(model)
        return sorted(state.ready) if state else []

    def serves(self, model: str, version: int | None) -> bool:
        state = self.models.get(model)
        if state is None or not state.ready:
            return False
        return version is None or version in state.ready

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None


@dataclass
class Fleet:
    """Edges keyed by id; ``ttl`` seconds without a heartbeat and an edge is gone."""

    ttl: float
    clock: Callable[[], float] = time.monotonic
    edges: dict[str, Edge] = field(default_factory=dict)
    eject_after: int = gateway_default("eject_after_failures")
    eject_base_s: float = gateway_default("eject_base_s")
    eject_max_s: float = gateway_default("eject_max_s")
    on_eject: Callable[[Edge], None] | None = None
    on_leave: Callable[[Edge], None] | None = None
    """Called with an edge that left, expired, or was replaced (a new URL) after the fact."""
    by_model: dict[str, dict[str, Edge]] = field(default_factory=dict, repr=False)
    """The edges whose last heartbeat lists a model, by model: a request looks only at the
    edges of its model, not the whole fleet (issue #17: with 1,000 edges, scanning all of
    them cost every request about 0.1 ms)."""

    def observe(self, beat: Heartbeat) -> None:
        now = self.clock()
        edge = self.edges.get(beat.edge_id)
        if edge is None or edge.url != beat.url:
            fresh = Edge(
                beat.edge_id, beat.url, beat.models, now, beat.device, pending=beat.inflight
            )
            self.edges[beat.edge_id] = fresh
            if edge is not None:
                self._gone(edge)
            self._index(fresh, ())
            return
        old, edge.models = edge.models, beat.models
        if old.keys() != beat.models.keys():
            self._unindex(edge, old.keys() - beat.models.keys())
            self._index(edge, old.keys())
        edge.last_seen = now
        edge.device = beat.device
        edge.pending = beat.inflight

    def leave(self, edge_id: str) -> None:
        edge = self.edges.pop(edge_id, None)
        if edge is not None:
            self._gone(edge)

    def _gone(self, edge: Edge) -> None:
        self._unindex(edge, edge.models)
        if self.on_leave is not None:
            self.on_leave(edge)

    def _index(self, edge: Edge, known: Iterable[str]) -> None:
        """List ``edge`` under the models of its last heartbeat it is not listed under yet
        (``known``: those it is)."""
        for model in edge.models.keys() - set(known):
            self.by_model.setdefault(model, {})[edge.edge_id] = edge

    def _unindex(self, edge: Edge, models: Iterable[str]) -> None:
        for model in models:
            listed = self.by_model.get(model)
            if listed is not None and listed.get(edge.edge_id) is edge:
                del listed[edge.edge_id]
                if not listed:
                    del self.by_model[model]

    def fresh(self) -> list[Edge]:
        """Edges heard from within ``ttl`` (ejected ones included); expired ones are dropped."""
        now = self.clock()
        for edge_id in [e.edge_id for e in self.edges.values() if now - e.last_seen > self.ttl]:
            self._gone(self.edges.pop(edge_id))
        return list(self.edges.values())

    def live_versions(self) -> set[tuple[str, str]]:
        """(model, version) pairs some fresh edge reports ready, ejected edges included."""
        return {
            (model, str(v))
            for e in self.fresh()
            for model, state in e.models.items()
            for v in state.ready
        }

    def knows(self, model: str) -> bool:
        return any(model in e.models for e in self.fresh())

    def serving(self, model: str, version: int | None, *, admitted: bool = True) -> list[Edge]:
        """Fresh edges with ``model`` ready (at ``version`` when given), admitted ones only
        unless ``admitted=False``."""
        return [
            e
            for e in self.fresh()
            if e.serves(model, version) and not (admitted and e.ejected_until is not None)
        ]

    def versions(self, model: str) -> list[int]:
        """Versions of ``model`` ready on at least one fresh, admitted edge, ascending."""
        found: set[int] = set()
        for edge in self.serving(model, None):
            found.update(edge.models[model].ready)
        return sorted(found)

    def choose(self, model: str, version: int | None, exclude: Iterable[str] = ()) -> Edge | None:
        """Least outstanding requests among the admitted edges serving ``model``/``version``."""
        now = self.clock()
        skip = exclude if isinstance(exclude, (list, set, tuple)) else list(exclude)
        best: Edge | None = None
        for e in self.by_model.get(model, {}).values():
            if (
                e.ejected_until is not None
                or now - e.last_seen > self.ttl
                or e.edge_id in skip
                or not e.serves(model, version)
            ):
                continue
            if best is None or (e.outstanding, e.pending, e.served) < (
                best.outstanding,
                best.pending,
                best.served,
            ):
                best = e
        return best

    def choose_newest(self, model: str, exclude: Sequence[str] = ()) -> tuple[Edge, int] | None:
        """The newest version of ``model`` on any admitted edge, and the edge to serve it.

        One pass, no allocation: this runs for every unversioned request.
        """
        now = self.clock()
        best: Edge | None = None
        newest = -1
        for e in self.by_model.get(model, {}).values():
            state = e.models.get(model)
            if (
                state is None
                or not state.ready
                or e.ejected_until is not None
                or now - e.last_seen > self.ttl
            ):
                continue
            top = max(state.ready)
            if top > newest:
                newest, best = top, None  # older versions' edges no longer count
            if (
                top == newest
                and e.edge_id not in exclude
                and (
                    best is None
                    or (e.outstanding, e.pending, e.served)
                    < (best.outstanding, best.pending, best.served)
                )
            ):
                best = e
        if best is None:
            return None
        return best, newest

    # -- health --------------------------------------------------------------------
    def record_success(self, edge: Edge) -> None:
        edge.failures = 0
        edge.ejections_in_a_row = 0
        edge.served += 1

    def record_failure(self, edge: Edge) -> bool:
        """Count a failure; eject after ``eject_after`` in a row. True if this ejected it."""
        edge.failures += 1
        if edge.ejected_until is None and edge.failures >= self.eject_after:
            self._eject(edge)
            return True
        return False

    def _eject(self, edge: Edge) -> None:
        # The exponent is capped (2**64 times any base is past any maximum): 2**1024 is
        # beyond a float, and an edge can fail its probe that many times in a row.
        backoff = self.eject_base_s * float(2 ** min(edge.ejections_in_a_row, 64))
        edge.ejected_until = self.clock() + min(backoff, self.eject_max_s)
        edge.ejections_in_a_row += 1
        if self.on_eject is not None:
            self.on_eject(edge)

    def due_for_probe(self) -> list[Edge]:
        """Ejected edges whose time out is over and that no probe is checking yet."""
        now = self.clock()
        return [
            e
            for e in self.fresh()
            if e.ejected_until is not None and now >= e.ejected_until and not e.probing
        ]

    def probed(self, edge: Edge, healthy: bool) -> None:
        """Re-admit ``edge`` after a good probe; eject it again (longer) after a bad one."""
        edge.probing = False
        if healthy:  # the backoff resets only once it has served a request again
            edge.ejected_until = None
            edge.failures = 0
        else:
            self._eject(edge)
