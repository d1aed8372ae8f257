"""HTTP/1.1 requests written by hand, for tests that need what HTTP clients will not send
(a header repeated, framing chosen per request)."""

from __future__ import annotations

import socket


def raw_request(
    url: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    chunked: bool = False,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """POST ``body`` to ``url + path`` on a fresh connection; (status, response body).

    ``Content-Length`` is added unless ``chunked`` (then the body goes as one chunk).
    """
    host, port = url.removeprefix("http://").split(":")
    lines = [f"POST {path} HTTP/1.1", "Host: gw", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]
