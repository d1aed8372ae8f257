"""The gateway's HTTP/1.1 upstream client against small real servers on loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fedcore.process import free_port
from gateway.upstream import Upstream, UpstreamError

OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Other: 1\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


class Server:
    """Answers each request with ``respond(request_bytes)``; counts connections."""

    def __init__(self, respond: Callable[[bytes], bytes | None]) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.respond(request)
                if answer is None:
                    continue  # never answer
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Respond = Callable[[bytes], bytes | None]
Serve = Callable[[Respond], Awaitable[tuple["Server", str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.base_events.Server] = []

    async def start(respond: Respond) -> tuple[Server, str]:
        handler = Server(respond)
        port = free_port()
        servers.append(await asyncio.start_server(handler.handle, "127.0.0.1", port))
        return handler, f"http://127.0.0.1:{port}"

    yield start
    for s in servers:
        s.close()


async def test_keep_alive_reuses_one_connection_and_forwards_bytes(serve: Serve) -> None:
    handler, url = await serve(lambda _: OK)
    upstream = Upstream(timeout_s=5)
    for _ in range(3):
        resp = await upstream.send(url, b"POST", b"/v2/x", [(b"content-type", b"a/b")], b"body")
        assert (resp.status, resp.body) == (200, b"{}")
        assert resp.headers == [(b"content-type", b"application/json")]  # framing headers only
    assert handler.connections == 1
    assert handler.requests[0].startswith(b"POST /v2/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"content-type: a/b\r\nContent-Length: 4\r\n\r\nbody" in handler.requests[0]
    await upstream.close()


async def test_a_stale_idle_connection_is_replaced_transparently(serve: Serve) -> None:
    handler, url = await serve(lambda _: OK)
    upstream = Upstream(timeout_s=5)
    await upstream.send(url, b"GET", b"/", [], b"")
    for writer in handler.writers:  # the edge closes its idle keep-alive connection
        writer.close()
    await asyncio.sleep(0.05)
    resp = await upstream.send(url, b"GET", b"/", [], b"")
    assert resp.status == 200 and handler.connections == 2
    await upstream.close()


async def test_chunked_responses_and_connection_close(serve: Serve) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    handler, url = await serve(lambda _: chunked)
    upstream = Upstream(timeout_s=5)
    assert (await upstream.send(url, b"GET", b"/", [], b"")).body == b"abcde"
    assert (await upstream.send(url, b"GET", b"/", [], b"")).body == b"abcde"
    assert handler.connections == 2  # Connection: close is honoured
    await upstream.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, "too-large"),
        (None, "timeout"),
    ],
)
async def test_failures_have_reasons(serve: Serve, answer: bytes | None, reason: str) -> None:
    _, url = await serve(lambda _: answer)
    upstream = Upstream(timeout_s=0.3, max_response_bytes=50)
    with pytest.raises(UpstreamError) as info:
        await upstream.send(url, b"GET", b"/", [], b"")
    assert info.value.reason == reason
    await upstream.close()


async def test_connection_refused_is_a_connect_error() -> None:
    upstream = Upstream(timeout_s=1)
    with pytest.raises(UpstreamError) as info:
        await upstream.send(f"http://127.0.0.1:{free_port()}", b"GET", b"/", [], b"")
    assert info.value.reason == "connect"
    with pytest.raises(UpstreamError, match="unsupported edge URL"):
        await upstream.send("https://127.0.0.1:1", b"GET", b"/", [], b"")


async def test_a_cancelled_request_never_leaves_its_answer_to_the_next(serve: Serve) -> None:
    answers = iter([None, OK])  # the first request is never answered in time
    handler, url = await serve(lambda _: next(answers))
    upstream = Upstream(timeout_s=5)
    task = asyncio.create_task(upstream.send(url, b"GET", b"/slow", [], b""))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    resp = await upstream.send(url, b"GET", b"/next", [], b"")
    assert resp.status == 200 and handler.connections == 2  # not the abandoned connection
    await upstream.close()
