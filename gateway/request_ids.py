"""Request ids for the gateway's log lines about inference requests that went wrong.

The data plane never decodes a request that succeeds, so it has no id to log for it and
logs nothing per request. When a request fails or is retried, :func:`request_id` finds
its Open Inference Protocol ``id`` (the client's, which tritonclient sets with
``request_id=``) in the first bytes of the JSON (or of the JSON header of a binary
request), or makes one up (``gw-`` and 16 hex digits) that the error response then
carries in ``x-request-id``. Only the error path pays for this.
"""

from __future__ import annotations

import json
import re
import secrets

from fedcore.wire import REQUEST_ID

SCAN_BYTES = 4096
"""How far into the body the id is looked for (tritonclient writes it first)."""
_ID = re.compile(rb'"id"\s*:\s*"((?:[^"\\]|\\.){1,256})"')


def generated_id() -> str:
    """A fresh id for a request that did not bring one."""
    return "gw-" + secrets.token_hex(8)


def client_id(body: bytes, header_length: bytes | None = None) -> str | None:
    """The request's own ``id`` when it is near the start of its JSON, else None.

    ``header_length`` is the ``Inference-Header-Content-Length`` of a binary request: only
    its JSON header is searched. Ids that are not 1-256 printable characters are ignored.
    """
    end = SCAN_BYTES
    if header_length is not None and header_length.isdigit() and len(header_length) <= 18:
        end = min(end, int(header_length))  # no int() of thousands of digits
    match = _ID.search(body[:end])
    if match is None:
        return None
    try:
        value = json.loads(b'"' + match.group(1) + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) and REQUEST_ID.fullmatch(value) else None


def request_id(body: bytes, header_length: bytes | None = None) -> str:
    """The client's id for the request, or a generated one."""
    return client_id(body, header_length) or generated_id()
