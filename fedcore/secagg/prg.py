"""Mask generation: AES-256-CTR keystreams keyed through HKDF-SHA256.

A mask is the AES-256-CTR keystream (zero IV; every key is derived for one stream only)
read as little-endian uint32 values. Keys come from HKDF-SHA256 over the seed material
(a 32-byte self-mask seed or an X25519 shared secret) with an ``info`` that names the
purpose and binds the round and the edges involved, so no key is reused across rounds,
purposes or pairs. numpy's RNG is never used for anything secret.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedcore.secagg.codec import Writer

KEY_BYTES = 32
_ZERO_IV = bytes(16)
_DOMAIN = "fedgate/secagg/v1"


def derive_key(ikm: bytes, purpose: str, *context: bytes | str) -> bytes:
    """A 32-byte key from ``ikm`` by HKDF-SHA256, ``info`` = domain, purpose and context."""
    info = Writer().text(_DOMAIN).text(purpose)
    for item in context:
        if isinstance(item, str):
            info.text(item)
        else:
            info.blob(item)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info.finish()).derive(ikm)


def keystream_into(key: bytes, out: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """Fill ``out`` (contiguous uint32) with the AES-256-CTR keystream of ``key``, in place."""
    out.fill(0)
    view = out.data.cast("B")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    encryptor.update_into(view, view)
    return out


def mask(key: bytes, length: int) -> NDArray[np.uint32]:
    """A fresh array of ``length`` uniform uint32 mask values from ``key``."""
    return keystream_into(key, np.empty(length, dtype="<u4"))


def add_mask(acc: NDArray[np.uint32], key: bytes, sign: int, scratch: NDArray[np.uint32]) -> None:
    """``acc += sign * mask(key)`` modulo 2**32, using ``scratch`` (same shape) as buffer."""
    keystream_into(key, scratch)
    if sign >= 0:
        np.add(acc, scratch, out=acc)
    else:
        np.subtract(acc, scratch, out=acc)


def uniform01(key: bytes, length: int) -> NDArray[np.float64]:
    """``length`` floats uniform in [0, 1) from ``key`` (32 random bits each)."""
    return mask(key, length).astype(np.float64) * (1.0 / 2**32)
