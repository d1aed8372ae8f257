"""A body limit for the API routes (everything but inference), which FastAPI does not have.

The data plane limits inference bodies (``max_body_bytes``). FastAPI reads a route's whole
body before it looks at the key, so without this any client could make the gateway read
and parse gigabytes. API bodies are small JSON documents: a declared ``Content-Length``
over :data:`API_MAX_BODY` is answered 413 at once; a chunked body is collected up to the
limit before the route sees it, and refused as soon as it goes over.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.validate import MAX_DIGITS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_MAX_BODY = 1024 * 1024
"""Bytes an API request body may have (the largest real one, a rollout spec, is ~1 KB)."""


async def within_limit(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int = API_MAX_BODY
) -> None:
    """Run ``app`` on an HTTP request whose body is at most ``limit`` bytes, else 413."""
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None:
        if declared.isdigit() and len(declared) <= MAX_DIGITS and int(declared) <= limit:
            await app(scope, receive, send)  # the server delivers exactly that many bytes
        else:
            shown = declared[:40].decode("latin-1")
            await _too_large(send, f"request body of {shown} bytes", limit)
        return
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await _too_large(send, "request body", limit)
            return
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    await app(scope, replay, send)


async def _too_large(send: Send, what: str, limit: int) -> None:
    body = json.dumps({"error": f"{what} exceeds the limit of {limit} for API routes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
