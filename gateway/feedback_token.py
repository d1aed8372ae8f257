"""Feedback tokens: which edge served a key's requests for a model, signed by the gateway.

Every inference response carries ``x-fedgate-feedback-token`` when the gateway has a
feedback secret (``FEDGATE_GATEWAY_FEEDBACK_SECRET_FILE``, the same file on every
replica). The client sends it back on ``POST /v1/feedback``; the gateway then asks that
one edge instead of the whole fleet. The token is ``<payload>.<mac>``: the payload is
``model``, ``edge``, ``key name`` and an expiry (unix seconds), the MAC HMAC-SHA256 over
it, so a client cannot point its label at another edge or another key. It names no
request id: ids are bound to the key on the edge (``<key name>/<id>`` in its spool), so
one token serves all of a key's requests to that edge and model until it expires, and the
request path pays a dictionary look-up, not an HMAC, per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import ConfigError
from fedcore.keys import read_secret

HEADER = "x-fedgate-feedback-token"
HEADER_BYTES = HEADER.encode()
TTL_S = 24 * 3600.0
"""How long a token routes feedback; a fresh one is minted when half of it is left."""
_MAX_TOKEN = 512
_MAX_CACHED = 4096


@dataclass(frozen=True, slots=True)
class Served:
    """What a valid token says: ``key`` was served ``model`` by ``edge`` until ``expires``."""

    model: str
    edge: str
    key: str
    expires: int


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class FeedbackTokens:
    """Mints (cached per model, edge and key) and verifies feedback tokens."""

    def __init__(self, secret: bytes, ttl_s: float = TTL_S) -> None:
        if len(secret) < 16:
            raise ValueError("the feedback secret must be at least 16 bytes")
        self._secret = hashlib.sha256(b"fedgate feedback token\0" + secret).digest()
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, str, str], tuple[float, bytes]] = {}

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def mint(self, model: str, edge: str, key: str, now: float | None = None) -> bytes:
        """The token for ``key`` served ``model`` by ``edge`` (reused while fresh)."""
        now = time.time() if now is None else now
        cached = self._cache.get((model, edge, key))
        if cached is not None and cached[0] - now > self.ttl_s / 2:
            return cached[1]
        expires = int(now + self.ttl_s)
        payload = f"{model}\n{edge}\n{key}\n{expires}".encode()
        token = _b64(payload) + b"." + _b64(self._mac(payload))
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[(model, edge, key)] = (float(expires), token)
        return token

    def verify(self, token: str, now: float | None = None) -> Served | None:
        """What ``token`` says, or None when it is malformed, forged or expired."""
        if len(token) > _MAX_TOKEN or token.count(".") != 1:
            return None
        encoded, mac = token.split(".")
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            given = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._mac(payload)):
            return None
        parts = payload.decode("utf-8", "replace").split("\n")
        if len(parts) != 4 or not parts[3].isdigit():
            return None
        served = Served(parts[0], parts[1], parts[2], int(parts[3]))
        if served.expires <= (time.time() if now is None else now):
            return None
        return served


def load_tokens(secret_file: Path | None) -> FeedbackTokens | None:
    """Tokens signed with the secret in ``secret_file``; None when it is unset."""
    if secret_file is None:
        return None
    secret = read_secret(secret_file).encode()
    if len(secret) < 16:
        raise ConfigError(f"{secret_file}: the feedback secret must be at least 16 bytes")
    return FeedbackTokens(secret)
