"""The web dashboard at ``/`` and the latency summary it charts.

``GET /`` serves one static page (``gateway/static/dashboard.html``) with its script and
style sheet under ``/ui/``; nothing is built and nothing is fetched from elsewhere (the
Content-Security-Policy says so to the browser). The page itself needs no key: its script
asks for one and calls the gateway's JSON API with ``Authorization: Bearer``.

``GET /v1/models/{model}/latency`` (any key) summarises the gateway's own latency
histogram per served version: request count, errors, mean and p50/p90/p99 estimated from
the buckets as Prometheus' ``histogram_quantile`` does (linear within a bucket).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from fastapi import APIRouter, Response

from gateway.errors import NotFound
from gateway.metrics import LATENCY_BUCKETS, RequestStats
from gateway.state import InferKey, State

router = APIRouter(tags=["dashboard"])

ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "content-security-policy": CSP,
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
QUANTILES = (0.5, 0.9, 0.99)


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
async def dashboard() -> Response:
    """The dashboard page (no key needed: it holds no data, its script asks for a key)."""
    return Response(_asset("dashboard.html"), media_type="text/html", headers=_HEADERS)


@router.get("/ui/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    """The dashboard's script and style sheet."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no dashboard asset {name!r}")
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


def quantile(q: float, counts: list[int]) -> float | None:
    """The ``q`` quantile of a histogram with :data:`LATENCY_BUCKETS` (the last is +Inf).

    Linear interpolation inside the bucket holding the rank, from 0 for the first bucket;
    a rank in the +Inf bucket gives the highest finite bound. None for an empty histogram.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def latency_summary(stats: RequestStats, model: str) -> list[dict[str, Any]]:
    """Per version of ``model`` (numeric order): requests, errors, mean and quantiles in ms.

    Requests that never reached a version (refused before routing) are left out.
    """
    errors: dict[str, int] = {}
    for (m, version, _edge, status), count in list(stats.requests.items()):
        if m == model and status >= 400:
            errors[version] = errors.get(version, 0) + count
    out = []
    for (m, version), series in list(stats.latency.items()):
        if m != model or not version:
            continue
        count = sum(series.counts)
        row: dict[str, Any] = {
            "version": version,
            "requests": count,
            "errors": errors.get(version, 0),
            "mean_ms": _ms(series.total / count) if count else None,
        }
        for q in QUANTILES:
            row[f"p{round(q * 100)}_ms"] = _ms(quantile(q, series.counts))
        out.append(row)
    return sorted(out, key=lambda r: (len(r["version"]), r["version"]))


@router.get("/v1/models/{model}/latency", tags=["metrics"])
async def model_latency(model: str, state: State, _: InferKey) -> dict[str, Any]:
    """Latency through the gateway per served version of ``model``, since it started."""
    return {
        "model": model,
        "versions": latency_summary(state.metrics.stats, model),
        "buckets_s": list(LATENCY_BUCKETS),
    }
