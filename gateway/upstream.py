"""The seam in front of the edges' Triton HTTP endpoints: bytes in, bytes out.

A small HTTP/1.1 client on asyncio protocols with ``httptools`` parsing the responses and
one keep-alive pool per edge. It forwards the request body and the framing headers
unchanged, so JSON and binary-tensor requests cost the same and nothing is decoded. It
exists because it is the gateway's hot path: per request it costs less than half the CPU
of an ``aiohttp`` client session (measured with ``benchmarks/gateway_overhead.py``).

Failures raise :class:`UpstreamError` with a ``reason``: ``connect`` (no connection could
be made), ``reset`` (the connection broke before a complete response), ``timeout``,
``protocol`` (the edge's answer was not HTTP we understand) or ``too-large``.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

from fedcore.errors import ReasonedError
from gateway.errors import GatewayError

# Framing and encoding headers pass both ways unchanged; compressed bodies stay compressed.
FORWARD_HEADERS = (
    "content-type",
    "inference-header-content-length",
    "content-encoding",
    "accept-encoding",
)
FORWARD_HEADER_BYTES = frozenset(h.encode() for h in FORWARD_HEADERS)
_MAX_IDLE_PER_EDGE = 64


RetryReason = Literal["connect", "reset", "protocol"]
"""Failures that say nothing about the model: the data plane tries another edge."""
UpstreamReason = Literal[RetryReason, "timeout", "too-large"]


class UpstreamError(ReasonedError[UpstreamReason], GatewayError):
    """An edge could not be reached or did not answer properly (``reason``: one of
    :data:`UpstreamReason`); ``message`` is ``"<reason>: <detail>"``."""

    status = 502


@dataclass(slots=True)
class UpstreamResponse:
    """An edge's answer; ``headers`` holds only :data:`FORWARD_HEADERS` (lowercase names)."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def str_headers(self) -> dict[str, str]:
        return {k.decode(): v.decode("latin-1") for k, v in self.headers}


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an edge; one request at a time.

    The connection finishes each exchange itself: on the last byte of the response it
    leaves the in-flight set, goes back to its pool (or closes) and resolves the waiter
    with the response, so the request path awaits one future and nothing else.
    """

    def __init__(self, pool: _EdgePool, busy: set[_Connection], max_body: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.pool = pool
        self.busy = busy
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.closed = False
        self.received = False
        self.deadline = 0.0
        self.max_body = max_body
        self.size = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError("reset", f"connection closed by the edge ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"unparseable response: {exc}"))
            self.close()

    # -- httptools callbacks -------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in FORWARD_HEADER_BYTES:
            self.headers.append((key, value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self._fail(UpstreamError("too-large", f"response over {self.max_body} bytes"))
            self.close()
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        self.busy.discard(self)
        chunks = self.chunks
        response = UpstreamResponse(
            self.parser.get_status_code(),
            chunks[0] if len(chunks) == 1 else b"".join(chunks),
            self.headers,
        )
        if self.parser.should_keep_alive():
            self.pool.give(self)
        else:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # -- use -----------------------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        waiter, self.waiter = self.waiter, None
        self.busy.discard(self)
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def abandon(self) -> None:
        """The request was cancelled (its client went away): a connection whose answer
        will never be read cannot be reused, or it would arrive as the next request's."""
        if self.waiter is not None:
            self.waiter = None
            self.busy.discard(self)
            self.close()

    def timed_out(self) -> None:
        self._fail(UpstreamError("timeout", "no complete response in time"))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes, waiter: asyncio.Future[UpstreamResponse], deadline: float) -> None:
        if self.transport is None:
            raise UpstreamError("connect", "connection not established")
        self.waiter = waiter
        self.deadline = deadline
        self.received = False
        self.size = 0
        self.headers = []
        self.chunks = []
        self.busy.add(self)
        self.transport.write(data)


class _EdgePool:
    """Idle keep-alive connections to one ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}".encode()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.retired = False  # the edge left: connections close when they come back
        self._lines: dict[tuple[bytes, bytes], bytes] = {}

    def request_line(self, method: bytes, path: bytes) -> bytes:
        """``METHOD path HTTP/1.1`` and the ``Host`` header, cached per method and path."""
        line = self._lines.get((method, path))
        if line is None:
            if len(self._lines) > 4096:
                self._lines.clear()
            line = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, self.authority)
            self._lines[(method, path)] = line
        return line

    def take(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def give(self, conn: _Connection) -> None:
        if not self.retired and len(self.idle) < _MAX_IDLE_PER_EDGE and not conn.closed:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Upstream:
    """Keep-alive pools to every edge, shared by every request of the gateway."""

    def __init__(
        self,
        timeout_s: float,
        connect_timeout_s: float = 2.0,
        max_response_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self._pools: dict[str, _EdgePool] = {}
        self._busy: set[_Connection] = set()
        self._tick = min(0.25, timeout_s / 4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        """Nothing to do: connections open on first use, in the serving event loop."""

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def forget(self, base_url: str) -> None:
        """Drop the pool of an edge that left: its idle connections close now, busy ones
        when their answer is in."""
        pool = self._pools.pop(base_url, None)
        if pool is not None:
            pool.retired = True
            pool.close()

    @property
    def pools(self) -> int:
        """How many edges have a pool (for tests and metrics)."""
        return len(self._pools)

    def _pool(self, base_url: str) -> _EdgePool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError("connect", f"unsupported edge URL {base_url!r}")
            pool = _EdgePool(parts.hostname, parts.port or 80)
            self._pools[base_url] = pool
        return pool

    async def _connect(self, pool: _EdgePool) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(pool, self._busy, self.max_response_bytes),
                    pool.host,
                    pool.port,
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError("connect", f"{pool.host}:{pool.port}: {exc}") from None
        return conn

    async def request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> UpstreamResponse:
        """Send one request to ``url`` (``http://host:port/path``)."""
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        extra = [(k.encode(), v.encode()) for k, v in headers.items()]
        return await self.send(base, method.encode(), path.encode(), extra, body or b"")

    async def send(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> UpstreamResponse:
        """The hot path: ``headers`` are already filtered; ``path`` is already encoded."""
        pool = self._pool(base_url)
        head = [pool.request_line(method, path)]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head += (b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        data = b"".join(head)
        conn = pool.take()
        if conn is not None:
            try:
                return await self._exchange(conn, data)
            except UpstreamError as exc:
                # An idle connection the edge closed meanwhile: retry once on a fresh one,
                # but only if the edge never started answering this request.
                if exc.reason != "reset" or conn.received:
                    raise
            except asyncio.CancelledError:
                conn.abandon()
                raise
        conn = await self._connect(pool)
        try:
            return await self._exchange(conn, data)
        except asyncio.CancelledError:
            conn.abandon()
            raise

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop serving this gateway, cached (``get_running_loop`` costs a getpid())."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
            self._sweeper = None
        return loop

    def _sweep(self) -> None:
        """Fail the requests past their deadline; re-arm while any is in flight."""
        loop = self._running_loop()
        now = loop.time()
        for conn in [c for c in self._busy if c.deadline <= now]:
            conn.timed_out()
        self._sweeper = loop.call_later(self._tick, self._sweep) if self._busy else None

    def _exchange(self, conn: _Connection, data: bytes) -> asyncio.Future[UpstreamResponse]:
        """Send ``data`` on ``conn``; the future resolves with the response (or the error).

        One sweeper for all requests enforces the deadlines rather than a timer each.
        """
        loop = self._running_loop()
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        conn.send(data, waiter, loop.time() + self.timeout_s)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick, self._sweep)
        return waiter
