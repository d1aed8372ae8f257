"""uvicorn's httptools protocol with plain infer requests taken off the ASGI path.

Through ASGI a response costs two socket writes (status and headers, then the body), a
task, an event and the message dicts; on a proxy whose every request is small that is a
large part of the CPU it spends. :class:`GatewayHttpProtocol` answers a ``POST .../infer``
that has a ``Content-Length``, no ``Expect: 100-continue`` and nothing else in progress on
its connection directly: the body is collected by the parser callbacks, the same
:class:`gateway.dataplane.InferPlane` serves it, and the response goes out in one write.
The key, its role and rate and the framing headers are checked as soon as the headers are
in (:meth:`gateway.dataplane.InferPlane.precheck`), before any body is kept: a request
refused there, or with a body over the limit, is answered (401, 403, 429, 400, 413) at
once, and its body drained up to :data:`DRAIN_LIMIT` without being kept, so that clients
that send everything before reading see the answer, not a reset. Every other request (and
any infer request not meeting those conditions, such as a pipelined one or a chunked
upload) takes uvicorn's normal ASGI path into the same app, so there is one data plane
with two entrances and one behaviour.

It builds on uvicorn's protocol internals (``cycle``, ``pipeline``, ``on_response_complete``,
``server_state``); :func:`protocol_class` checks they exist and falls back to plain
``httptools`` otherwise. Pass it to uvicorn as ``http=``.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.dataplane import InferPlane, split_infer_path
from gateway.errors import GatewayError, PayloadTooLarge
from gateway.validate import parse_count

log = logging.getLogger(__name__)

_REQUIRED = ("on_headers_complete", "on_body", "on_message_complete", "on_response_complete")
DRAIN_LIMIT = 64 * 1024 * 1024
"""Bytes of an over-limit body read and discarded after its 413 before closing instead."""
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class _Placeholder:
    """Stands in for uvicorn's request cycle while a fast request is in flight, so that a
    pipelined request behind it waits its turn and shutdown and disconnects reach it."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "response_complete")

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive
        self.message_event = asyncio.Event()


class _FastRequest:
    """One fast-path request: its body as it arrives, and which of the two ends (the body
    fully received, the response written) has happened; the second one completes it."""

    __slots__ = (
        "body",
        "cycle",
        "declared",
        "headers",
        "keep",
        "pre",
        "previous",
        "received",
        "responded",
        "size",
        "target",
    )

    def __init__(
        self,
        target: tuple[str, str | None],
        headers: list[tuple[bytes, bytes]],
        cycle: _Placeholder,
        previous: Any,
        declared: int,
    ) -> None:
        self.target = target
        self.headers = headers
        self.cycle = cycle
        self.previous = previous
        self.declared = declared
        self.body: list[bytes] = []
        self.keep = False  # the body is kept (checks passed, within the limit)
        self.pre: Any = None  # the plane's precheck result: its request, or its refusal
        self.size = 0
        self.received = False
        self.responded = False


class GatewayHttpProtocol(HttpToolsProtocol):
    """Set ``plane`` (class attribute, see :func:`protocol_class`) before serving."""

    plane: InferPlane | None = None
    max_body: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast: _FastRequest | None = None

    def _fast_target(self) -> tuple[tuple[str, str | None], int] | None:
        """The infer target and declared body size if this request may take the fast path."""
        url = self.url
        if (
            self.plane is None
            or self.expect_100_continue
            or self._fast is not None
            or not url.endswith(b"/infer")  # also rules out query strings
            or b"%" in url  # percent-encoded paths: let uvicorn decode them
            or self.parser.get_method() != b"POST"
            or self.parser.should_upgrade()
        ):
            return None
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # something in progress: uvicorn keeps responses in order
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
        declared = None if length is None else parse_count(length)
        if declared is None:
            return None
        target = split_infer_path(url.decode("latin-1"))
        return None if target is None else (target, declared)

    def on_headers_complete(self) -> None:
        found = self._fast_target()
        if found is None:
            super().on_headers_complete()
            return
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        placeholder = _Placeholder(keep_alive)
        fast = _FastRequest(found[0], self.headers, placeholder, self.cycle, found[1])
        self._fast = fast
        self.cycle = placeholder  # type: ignore[assignment]
        assert self.plane is not None
        try:
            fast.pre = self.plane.precheck(fast.headers)
            fast.keep = fast.declared <= self.max_body
        except GatewayError as exc:
            fast.pre = exc
        if not fast.keep:
            # Answer now (401, 403, 429, 400 or 413) and drain the body meanwhile, so that a
            # client that sends it all before reading gets its answer, not a reset.
            self._start(fast)

    def on_body(self, body: bytes) -> None:
        fast = self._fast
        if fast is None:
            super().on_body(body)
            return
        fast.size += len(body)
        if fast.keep:
            fast.body.append(body)
        elif fast.size > max(self.max_body, DRAIN_LIMIT):
            self.transport.close()  # not worth draining any further

    def on_message_complete(self) -> None:
        fast = self._fast
        if fast is None:
            super().on_message_complete()
            return
        self._fast = None
        fast.received = True
        if fast.keep:
            self._start(fast)
        elif fast.responded:
            self._finish(fast)

    def _start(self, fast: _FastRequest) -> None:
        task = self.loop.create_task(self._serve(fast))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _serve(self, fast: _FastRequest) -> None:
        assert self.plane is not None

        async def read(_: bytes | None, limit: int) -> bytes:
            if fast.declared > limit:
                raise PayloadTooLarge(
                    f"request body of {fast.declared} bytes exceeds the limit of {limit}"
                )
            return b"".join(fast.body)

        async def reply(status: int, content: bytes, headers: list[tuple[bytes, bytes]]) -> None:
            self._write(fast.cycle, status, content, headers)

        try:
            await self.plane.serve(fast.target, fast.headers, read, reply, fast.pre)
        finally:
            fast.responded = True
            if fast.received:
                self._finish(fast)

    def _finish(self, fast: _FastRequest) -> None:
        """Both the body is in and the response is out: the connection moves on."""
        fast.cycle.response_complete = True
        if not fast.cycle.keep_alive and not self.transport.is_closing():
            self.transport.close()
        if self.cycle is fast.cycle:  # type: ignore[comparison-overlap]  # placeholder
            self.cycle = fast.previous
        self.on_response_complete()

    def _write(
        self, cycle: _Placeholder, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if cycle.disconnected or self.transport.is_closing():
            return
        out = [_STATUS.get(status) or f"HTTP/1.1 {status} \r\n".encode()]
        for name, value in (*self.server_state.default_headers, *headers):
            out += (name, b": ", value, b"\r\n")
        out += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        if not cycle.keep_alive:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", body)
        self.transport.write(b"".join(out))


def protocol_class(plane: InferPlane, max_body: int) -> type[HttpToolsProtocol] | str:
    """A protocol class serving ``plane`` fast, or ``"httptools"`` if uvicorn changed."""
    if not all(hasattr(HttpToolsProtocol, name) for name in _REQUIRED):
        log.warning("uvicorn's protocol internals changed: infer requests go through ASGI")
        return "httptools"

    class Bound(GatewayHttpProtocol):
        pass

    Bound.plane = plane
    Bound.max_body = max_body
    return Bound
