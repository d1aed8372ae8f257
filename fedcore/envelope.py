"""The sealed model update envelope, sans-IO: bytes in, bytes out.

An edge seals a payload for the trainer:

- a fresh 32-byte content key, wrapped with HPKE base mode to the trainer's public key
  (the suite is named in the header; HPKE ``info`` binds the header digest);
- the payload in AES-256-GCM chunks, STREAM style: nonce = 7-byte prefix (from the header
  digest) || 32-bit chunk index || last-chunk flag, associated data = header digest ||
  index || flag, so reordered, duplicated, dropped or truncated chunks fail;
- an Ed25519 signature of the edge over the header digest and the SHA-256 of everything
  after the signature (wrapped key and chunks), so the edge is bound to the exact
  ciphertext, even against a holder of the trainer's key (GCM tags alone are not binding
  for someone who knows the content key).

The body digest runs beside the cipher: ``hashlib``'s ``update`` releases the GIL, so on
more than one core a digest thread hashes chunk ``i`` while AES-GCM (which holds the GIL)
seals chunk ``i + 1``, and on open hashes the whole body while the chunks are decrypted.
The signature is still checked before anything is returned: a body whose signature fails
is reported as ``bad-signature`` even when a chunk also fails to decrypt. A receiver that
owns a writable envelope buffer (the trainer, for an update read from the object store)
opens it in place: each chunk's plaintext is written over ciphertext the digest has
consumed, so a large update is in memory once, not as envelope plus payload.

Wire layout::

    "FGUE" | u8 wire version | u32 header length | header | signature (64)
           | wrapped key (HPKE enc || sealed key) | chunk 0 | ... | chunk n-1

Each chunk is its plaintext length plus a 16-byte tag; all chunks but the last hold
``chunk_size`` plaintext bytes. The receiver checks framing, looks up the edge's key,
verifies the signature and decrypts (beside the digest for bodies from 256 KiB), and hands
out the plaintext only once the signature verified; the round, model and base are for the
caller to check (:func:`fedcore.envelope_header.check_header`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcore.envelope_header import (
    MAX_HEADER_BYTES,
    UpdateHeader,
    check_header,
    chunk_count_for,
)
from fedcore.errors import EnvelopeError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SUITES",
    "SUITE_MLKEM768_X25519",
    "SUITE_X25519",
    "BytesLike",
    "EdgeKeyLookup",
    "RecipientPrivateKey",
    "RecipientPublicKey",
    "UpdateHeader",
    "check_header",
    "generate_recipient_key",
    "open_update",
    "read_header_unverified",
    "seal_update",
    "suite_of",
]

BytesLike = bytes | bytearray | memoryview
RecipientPrivateKey = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
RecipientPublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
EdgeKeyLookup = Callable[[str], ed25519.Ed25519PublicKey | None]

SUITE_X25519 = "x25519-hkdf-sha256-aes256gcm"
SUITE_MLKEM768_X25519 = "mlkem768x25519-hkdf-sha256-aes256gcm"
_HPKE = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
_ENC_LEN = {
    SUITE_X25519: hpke.KEM.X25519.enc_length(),
    SUITE_MLKEM768_X25519: hpke.KEM.MLKEM768_X25519.enc_length(),
}
SUITES = tuple(_HPKE)

DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_PAYLOAD = 2**31  # hard ceiling; receivers pass their own, smaller max_payload
WIRE_VERSION = 1
_MAGIC = b"FGUE"
_PREAMBLE = struct.Struct(">4sBI")
_SIG_LEN = 64
_KEY_LEN = 32
_TAG_LEN = 16
_WRAPPED_EXTRA = _KEY_LEN + _TAG_LEN
_CHUNK_PARAMS = struct.Struct(">IB")
_NONCE_PREFIX_LEN = 7
_HEADER_CONTEXT = b"fedgate/update/v1/header\x00"
_KEY_CONTEXT = b"fedgate/update/v1/content-key\x00"
_SIG_CONTEXT = b"fedgate/update/v1/signature\x00"
_ALIGN = 16
"""A payload opened in place starts at a multiple of this in the envelope's buffer."""
_BACKGROUND_MIN = 256 * 1024
"""Bodies from this size on are hashed in the digest thread, beside the cipher."""


def generate_recipient_key(suite: str = SUITE_X25519) -> RecipientPrivateKey:
    """A fresh trainer (recipient) private key for ``suite``."""
    if suite == SUITE_X25519:
        return x25519.X25519PrivateKey.generate()
    if suite == SUITE_MLKEM768_X25519:
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        )
    raise EnvelopeError("unsupported-suite", f"suite {suite!r} is not one of {list(SUITES)}")


def suite_of(key: RecipientPrivateKey | RecipientPublicKey) -> str:
    """The suite name a recipient key belongs to."""
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return SUITE_X25519
    if isinstance(key, hpke.MLKEM768X25519PrivateKey | hpke.MLKEM768X25519PublicKey):
        return SUITE_MLKEM768_X25519
    raise TypeError(f"{type(key).__name__} is not an X25519 or ML-KEM-768+X25519 key")


def seal_update(
    payload: BytesLike,
    *,
    recipient: RecipientPublicKey,
    signer: ed25519.Ed25519PrivateKey,
    model: str,
    round: int,
    edge_id: str,
    base_version: int,
    base_digest: str,
    compression: str = "none",
    num_samples: int = 0,
    update_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metrics: Mapping[str, float] | None = None,
) -> tuple[UpdateHeader, bytearray]:
    """Encrypt ``payload`` to ``recipient`` and sign it as ``edge_id``; returns the header
    and the envelope bytes. ``update_id`` defaults to 16 random bytes in hex; ``metrics``
    (optional) are signed, in clear, with the header."""
    src = memoryview(payload).cast("B")
    if len(src) > MAX_PAYLOAD:
        raise EnvelopeError("oversize", f"payload is {len(src)} bytes, over {MAX_PAYLOAD}")
    suite = suite_of(recipient)
    header = UpdateHeader(
        suite=suite,
        model=model,
        round=round,
        edge_id=edge_id,
        base_version=base_version,
        base_digest=base_digest,
        update_id=update_id if update_id is not None else os.urandom(16).hex(),
        payload_len=len(src),
        chunk_size=chunk_size,
        chunk_count=chunk_count_for(len(src), chunk_size),
        compression=compression,
        num_samples=num_samples,
        metrics=dict(metrics) if metrics is not None else None,
    )
    header_bytes = header.encode()
    header_digest = _header_digest(header_bytes)
    sig_at = _PREAMBLE.size + len(header_bytes)
    body_at = sig_at + _SIG_LEN
    out = bytearray(body_at + _body_len(header))
    _PREAMBLE.pack_into(out, 0, _MAGIC, WIRE_VERSION, len(header_bytes))
    out[_PREAMBLE.size : sig_at] = header_bytes

    content_key = AESGCM.generate_key(bit_length=256)
    wrapped = _HPKE[suite].encrypt(content_key, recipient, info=_KEY_CONTEXT + header_digest)
    chunks_at = body_at + len(wrapped)
    out[body_at:chunks_at] = wrapped
    view = memoryview(out)
    digest = _BodyDigest(background=header.chunk_count > 1 and len(src) >= _BACKGROUND_MIN)
    digest.update(view[body_at:chunks_at])
    _encrypt_chunks(
        AESGCM(content_key), header, header_digest, src, view[chunks_at:], digest.update
    )
    out[sig_at:body_at] = signer.sign(_SIG_CONTEXT + header_digest + digest.digest())
    return header, out


def open_update(
    data: BytesLike,
    *,
    recipient: RecipientPrivateKey,
    edge_keys: EdgeKeyLookup,
    max_payload: int,
    in_place: bool = False,
) -> tuple[UpdateHeader, bytearray | memoryview]:
    """Verify and decrypt an envelope; returns its header and the plaintext payload.

    ``edge_keys`` maps an edge id to its Ed25519 public key (``None``: unknown edge).
    ``in_place``: ``data`` is a writable buffer the caller hands over; each chunk is
    decrypted into it, over ciphertext already hashed for the signature, and the payload
    is a view of ``data`` (no second buffer of the payload's size). Afterwards ``data``
    no longer holds the envelope, whatever the outcome; chunks are decrypted into it
    before the signature is checked, so on a refusal the payload region is zeroed (no
    plaintext whose signature did not verify is left in the caller's buffer).
    Raises ``EnvelopeError`` with the reason: ``malformed``, ``truncated``, ``oversize``,
    ``unsupported-suite``, ``unknown-edge``, ``bad-signature`` or ``decrypt-failed``.
    """
    view = memoryview(data).cast("B")
    header, header_digest, body_at = _parse_frame(view, max_payload)
    if header.suite != suite_of(recipient):
        raise EnvelopeError(
            "unsupported-suite",
            f"update is sealed with {header.suite}, this receiver holds a "
            f"{suite_of(recipient)} key",
        )
    public = edge_keys(header.edge_id)
    if public is None:
        raise EnvelopeError("unknown-edge", f"no public key for edge {header.edge_id!r}")
    body = view[body_at:]
    digest = _BodyDigest(background=len(body) >= _BACKGROUND_MIN)
    payload: bytearray | memoryview
    failure: EnvelopeError | None = None
    if in_place:
        if view.readonly:
            raise ValueError("in_place needs a writable buffer")
        start = -(-body_at // _ALIGN) * _ALIGN  # within the wrapped key: aligned for numpy
        payload = view[start : start + header.payload_len]
        failure = _decrypt_in_place(recipient, header, header_digest, body, payload, digest)
    else:
        digest.update(body)
        payload = bytearray(header.payload_len)
        try:  # beside the digest thread; nothing leaves before the signature verifies
            _decrypt_body(recipient, header, header_digest, body, payload)
        except EnvelopeError as exc:
            failure = exc
    try:
        public.verify(
            bytes(view[body_at - _SIG_LEN : body_at]),
            _SIG_CONTEXT + header_digest + digest.digest(),
        )
    except InvalidSignature:
        failure = EnvelopeError(
            "bad-signature", f"signature of edge {header.edge_id!r} does not verify"
        )
    if failure is not None:
        if in_place:
            _zero(payload)
        raise failure
    return header, payload


_ZEROS = memoryview(bytes(1 << 20))


def _zero(buffer: bytearray | memoryview) -> None:
    """Overwrite ``buffer`` with zeros, a MiB at a time (no buffer of its size)."""
    view = memoryview(buffer).cast("B")
    for at in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - at)
        view[at : at + n] = _ZEROS[:n]


def read_header_unverified(data: BytesLike) -> UpdateHeader:
    """The header of an envelope, parsed but NOT authenticated: for logs and routing only."""
    header, _, _ = _parse_frame(memoryview(data).cast("B"), MAX_PAYLOAD)
    return header


Hasher = Any  # hashlib's hash object (its type is private)


@functools.cache
def _digest_pool() -> ThreadPoolExecutor:
    """One digest thread per process; tasks run in order, so one hasher's updates do too."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgate-digest")


# A forked child inherits the cached pool but not its thread: it starts a pool of its own.
os.register_at_fork(after_in_child=_digest_pool.cache_clear)


def _update_started(hasher: Hasher, data: memoryview, started: threading.Event) -> None:
    started.set()
    hasher.update(data)  # releases the GIL (hashlib does for updates over 2 KiB)


class _BodyDigest:
    """SHA-256 of the body, fed piece by piece, hashed in the digest thread if ``background``.

    AES-GCM holds the GIL for a whole chunk, so a digest thread that needed the GIL back
    between pieces would wait out the interpreter's switch interval (5 ms) each time.
    ``update`` therefore blocks until the digest thread has taken the piece (and has thus
    finished the one before): the cipher thread hands over the GIL at that moment, and the
    thread then hashes without it while the next chunk is sealed.
    """

    def __init__(self, *, background: bool) -> None:
        self._hasher = hashlib.sha256()
        self._pool = _digest_pool() if background else None
        self._pending: list[Future[None]] = []

    def update(self, data: memoryview) -> None:
        if self._pool is None:
            self._hasher.update(data)
            return
        started = threading.Event()
        self._pending.append(self._pool.submit(_update_started, self._hasher, data, started))
        started.wait()

    def flush(self) -> None:
        """Wait until every piece given so far is hashed."""
        for update in self._pending:
            update.result()

    def digest(self) -> bytes:
        self.flush()
        return self._hasher.digest()


def _unwrap(
    recipient: RecipientPrivateKey, header: UpdateHeader, header_digest: bytes, body: memoryview
) -> AESGCM:
    """The chunk cipher, from the wrapped content key at the start of ``body``."""
    wrapped_len = _ENC_LEN[header.suite] + _WRAPPED_EXTRA
    try:
        content_key = _HPKE[header.suite].decrypt(
            body[:wrapped_len], recipient, info=_KEY_CONTEXT + header_digest
        )
    except InvalidTag:
        raise EnvelopeError("decrypt-failed", "content key does not unwrap") from None
    return AESGCM(content_key)


def _decrypt_body(
    recipient: RecipientPrivateKey,
    header: UpdateHeader,
    header_digest: bytes,
    body: memoryview,
    out: bytearray,
) -> None:
    aead = _unwrap(recipient, header, header_digest, body)
    wrapped_len = _ENC_LEN[header.suite] + _WRAPPED_EXTRA
    _decrypt_chunks(aead, header, header_digest, body[wrapped_len:], out)


def _decrypt_in_place(
    recipient: RecipientPrivateKey,
    header: UpdateHeader,
    header_digest: bytes,
    body: memoryview,
    out: memoryview,
    digest: _BodyDigest,
) -> EnvelopeError | None:
    """Hash ``body`` into ``digest`` and decrypt its chunks into ``out``, a view of the
    same buffer that starts within the wrapped key (hashed and unwrapped before any chunk
    is written): plaintext ``i`` ends before ciphertext ``i + 1`` starts, so only bytes
    hashed already are overwritten. Returns the first failure, the body still hashed."""
    wrapped_len = _ENC_LEN[header.suite] + _WRAPPED_EXTRA
    area, size, n = body[wrapped_len:], header.chunk_size, header.chunk_count
    sealed = [area[i * (size + _TAG_LEN) : (i + 1) * (size + _TAG_LEN)] for i in range(n)]
    digest.update(body[:wrapped_len])
    try:
        aead = _unwrap(recipient, header, header_digest, body)
    except EnvelopeError as exc:
        for piece in sealed:
            digest.update(piece)
        return exc
    scratch = memoryview(bytearray(min(size, header.payload_len)))
    for i, piece in enumerate(sealed):
        if i == 0:
            digest.update(piece)
        plain = scratch[: len(piece) - _TAG_LEN]
        nonce, ad = _chunk_params(header_digest, i, i == n - 1)
        try:  # the digest thread hashes this chunk meanwhile
            aead.decrypt_into(nonce, piece, ad, plain)
        except InvalidTag:
            for rest in sealed[i + 1 :]:
                digest.update(rest)
            return EnvelopeError("decrypt-failed", f"chunk {i} of {n} fails authentication")
        if i + 1 < n:  # the thread takes chunk i + 1 only once chunk i is hashed
            digest.update(sealed[i + 1])
        else:
            digest.flush()
        out[i * size : i * size + len(plain)] = plain
    return None


def _header_digest(header_bytes: bytes) -> bytes:
    return hashlib.sha256(_HEADER_CONTEXT + header_bytes).digest()


def _body_len(header: UpdateHeader) -> int:
    wrapped = _ENC_LEN[header.suite] + _WRAPPED_EXTRA
    return wrapped + header.payload_len + _TAG_LEN * header.chunk_count


def _parse_frame(view: memoryview, max_payload: int) -> tuple[UpdateHeader, bytes, int]:
    """Check magic, lengths and header; returns (header, header digest, body offset)."""
    if len(view) >= len(_MAGIC) and view[: len(_MAGIC)] != _MAGIC:
        raise EnvelopeError("malformed", "not a fedgate update envelope (bad magic)")
    if len(view) < _PREAMBLE.size:
        raise EnvelopeError("truncated", f"envelope is {len(view)} bytes, shorter than preamble")
    _, wire_version, header_len = _PREAMBLE.unpack_from(view)
    if wire_version != WIRE_VERSION:
        raise EnvelopeError("malformed", f"wire version {wire_version} is not {WIRE_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise EnvelopeError("malformed", f"header length {header_len} over {MAX_HEADER_BYTES}")
    body_at = _PREAMBLE.size + header_len + _SIG_LEN
    if len(view) < body_at:
        raise EnvelopeError("truncated", f"envelope is {len(view)} bytes, ends before its body")
    header_bytes = bytes(view[_PREAMBLE.size : _PREAMBLE.size + header_len])
    header = UpdateHeader.decode(header_bytes)
    if header.suite not in _HPKE:
        raise EnvelopeError("unsupported-suite", f"suite {header.suite!r} is not supported")
    if header.payload_len > max_payload:
        raise EnvelopeError(
            "oversize", f"payload_len {header.payload_len} is over the limit {max_payload}"
        )
    expected = body_at + _body_len(header)
    if len(view) < expected:
        raise EnvelopeError("truncated", f"envelope is {len(view)} bytes, header says {expected}")
    if len(view) > expected:
        raise EnvelopeError(
            "malformed", f"envelope is {len(view)} bytes, {len(view) - expected} after its end"
        )
    return header, _header_digest(header_bytes), body_at


def _chunk_params(header_digest: bytes, index: int, last: bool) -> tuple[bytes, bytes]:
    """(nonce, associated data) of chunk ``index``."""
    tail = _CHUNK_PARAMS.pack(index, last)
    return header_digest[:_NONCE_PREFIX_LEN] + tail, header_digest + tail


def _encrypt_chunks(
    aead: AESGCM,
    header: UpdateHeader,
    header_digest: bytes,
    src: memoryview,
    dst: memoryview,
    sealed: Callable[[memoryview], None],
) -> None:
    """Seal every chunk into ``dst``, handing each sealed chunk to ``sealed`` in order."""
    size, n = header.chunk_size, header.chunk_count
    for i in range(n):
        plain = src[i * size : (i + 1) * size]
        at = i * (size + _TAG_LEN)
        nonce, ad = _chunk_params(header_digest, i, i == n - 1)
        chunk = dst[at : at + len(plain) + _TAG_LEN]
        aead.encrypt_into(nonce, plain, ad, chunk)
        sealed(chunk)


def _decrypt_chunks(
    aead: AESGCM, header: UpdateHeader, header_digest: bytes, src: memoryview, out: bytearray
) -> None:
    size, n = header.chunk_size, header.chunk_count
    dst = memoryview(out)
    for i in range(n):
        plain = dst[i * size : (i + 1) * size]
        at = i * (size + _TAG_LEN)
        nonce, ad = _chunk_params(header_digest, i, i == n - 1)
        try:
            aead.decrypt_into(nonce, src[at : at + len(plain) + _TAG_LEN], ad, plain)
        except InvalidTag:
            raise EnvelopeError(
                "decrypt-failed", f"chunk {i} of {n} fails authentication"
            ) from None
