"""The seam in front of the edges' Triton HTTP endpoints: bytes in, bytes out (aiohttp).

The inference path forwards the request body and the framing headers unchanged, so JSON
and binary-tensor requests cost the same and nothing is decoded that need not be.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

# Framing and encoding headers pass both ways unchanged; compressed bodies stay compressed.
FORWARD_HEADERS = (
    "content-type",
    "inference-header-content-length",
    "content-encoding",
    "accept-encoding",
)


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    body: bytes
    headers: dict[str, str]


class Upstream:
    """One pooled aiohttp session shared by every request of the gateway."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> UpstreamResponse:
        """Send one request; connection errors propagate as ``aiohttp.ClientError``."""
        if self._session is None:
            raise RuntimeError("Upstream.open() was not awaited")
        async with self._session.request(method, url, data=body, headers=headers) as resp:
            data = await resp.read()
            kept = {k.lower(): v for k, v in resp.headers.items() if k.lower() in FORWARD_HEADERS}
            return UpstreamResponse(resp.status, data, kept)
