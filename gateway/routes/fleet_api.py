"""The fleet API: which edges exist, what they serve, how busy and healthy they are."""

from __future__ import annotations

import time

from fastapi import APIRouter

from gateway.state import InferKey, State

router = APIRouter(tags=["fleet"])


@router.get("/v1/edges")
async def list_edges(state: State, _: InferKey) -> dict[str, object]:
    now = state.fleet.clock()
    edges = [
        {
            "edge_id": e.edge_id,
            "url": e.url,
            "device": e.device,
            "models": {m: s.model_dump() for m, s in e.models.items()},
            "outstanding": e.outstanding,
            "pending": e.pending,
            "served": e.served,
            "failures": e.failures,
            "ejected": e.ejected,
            "ejected_for_s": round(max(0.0, e.ejected_until - now), 3) if e.ejected_until else 0,
            "last_seen_s": round(now - e.last_seen, 3),
        }
        for e in sorted(state.fleet.fresh(), key=lambda e: e.edge_id)
    ]
    return {"edges": edges, "ts": time.time()}
