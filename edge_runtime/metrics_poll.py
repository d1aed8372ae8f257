"""Triton's own load figures, read from its Prometheus metrics endpoint.

:func:`parse_load` is pure (Prometheus text in, :class:`TritonLoad` out); :class:`MetricsPoller`
fetches the text over HTTP from the edge's own tritonserver (loopback, a few KB, about a
millisecond). Only the counters the idle detector needs are kept, summed over the
versions of one model.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from dataclasses import dataclass

PENDING = "nv_inference_pending_request_count"
SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
QUEUE_US = "nv_inference_queue_duration_us"
_WANTED = frozenset({PENDING, SUCCESS, FAILURE, QUEUE_US})
_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class TritonLoad:
    """One reading: pending requests now, and cumulative counters since Triton started."""

    ts: float
    pending: int
    requests: int  # successful + failed requests
    queue_us: float  # cumulative time requests spent queued

    def rate_since(self, earlier: TritonLoad) -> float:
        """Requests per second between two readings (0 when the counter went back)."""
        dt = self.ts - earlier.ts
        done = self.requests - earlier.requests
        return done / dt if dt > 0 and done > 0 else 0.0

    def queue_us_since(self, earlier: TritonLoad) -> float:
        """Mean queue time per request between two readings, in microseconds."""
        done = self.requests - earlier.requests
        waited = self.queue_us - earlier.queue_us
        return waited / done if done > 0 and waited > 0 else 0.0


def parse_load(text: str, model: str, ts: float) -> TritonLoad:
    """Sum the counters of ``model`` (every version) out of Prometheus exposition text."""
    totals = dict.fromkeys(_WANTED, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line.strip())
        if match is None or match.group(1) not in _WANTED:
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        if labels.get("model") != model:
            continue
        try:
            totals[match.group(1)] += float(match.group(3))
        except ValueError:
            continue
    return TritonLoad(
        ts=ts,
        pending=int(totals[PENDING]),
        requests=int(totals[SUCCESS] + totals[FAILURE]),
        queue_us=totals[QUEUE_US],
    )


class MetricsPoller:
    """Reads ``http://host:port/metrics`` of the edge's tritonserver."""

    def __init__(self, url: str, timeout_s: float = 1.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def fetch_text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:  # noqa: S310 - loopback
            return bytes(resp.read()).decode("utf-8", errors="replace")

    async def read(self, model: str) -> TritonLoad:
        """One reading for ``model`` (raises ``OSError`` when Triton does not answer)."""
        text = await asyncio.to_thread(self.fetch_text)
        return parse_load(text, model, time.monotonic())
