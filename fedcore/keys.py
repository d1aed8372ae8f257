"""Key files: Ed25519 identities and signing keys, the trainer's HPKE key.

Private keys are PEM (PKCS#8, unencrypted) files written with mode 0600; loading a
private key file readable by group or others is refused. Public keys are raw values,
hex-encoded, so they fit in registries and NATS KV values.

The trainer's HPKE key (the one edges seal updates to) has one of two KEMs:

- ``x25519``: one X25519 PKCS#8 block; its public file is the bare hex of the 32-byte
  key (the format of every earlier version, still read as X25519).
- ``mlkem768-x25519``: hybrid post-quantum ML-KEM-768 + X25519 (HPKE's
  ``MLKEM768_X25519``). The private file holds two PKCS#8 blocks, ML-KEM-768 (its
  64-byte seed) then X25519; the public file is one line ``mlkem768-x25519 <hex>``, the
  hex of the 1,184-byte ML-KEM-768 encapsulation key followed by the 32-byte X25519 key.

An edge reads the public file and seals with the suite it names
(:func:`read_hpke_public`); the trainer loads the private file for the KEM its settings
select and refuses a file of the other kind (:func:`load_hpke_key`).
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from fedcore.envelope import RecipientPrivateKey, RecipientPublicKey
from fedcore.errors import KeyFileError
from fedcore.files import write_atomic

PRIVATE_MODE = 0o600


def _write_private(path: Path, pem: bytes) -> None:
    write_atomic(path, pem, PRIVATE_MODE)


def _read_private(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"private key file {path} does not exist") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    return path.read_bytes()


def _pem(
    key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey | mlkem.MLKEM768PrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_ed25519(path: Path) -> ed25519.Ed25519PrivateKey:
    """Create an Ed25519 private key file (0600) and return the key."""
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(path, _pem(key))
    return key


def generate_x25519(path: Path) -> x25519.X25519PrivateKey:
    """Create an X25519 private key file (0600) and return the key."""
    key = x25519.X25519PrivateKey.generate()
    _write_private(path, _pem(key))
    return key


def load_ed25519(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load an Ed25519 private key file, refusing loose permissions or another key type."""
    key = serialization.load_pem_private_key(_read_private(path), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_x25519(path: Path) -> x25519.X25519PrivateKey:
    """Load an X25519 private key file, refusing loose permissions or another key type."""
    key = serialization.load_pem_private_key(_read_private(path), password=None)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an X25519 key")
    return key


def public_hex(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> str:
    """The raw public key of ``key``, hex-encoded."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def ed25519_public_from_hex(value: str) -> ed25519.Ed25519PublicKey:
    """Parse a hex-encoded raw Ed25519 public key."""
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(value.strip()))
    except ValueError as exc:
        raise KeyFileError(f"not a hex-encoded Ed25519 public key: {exc}") from None


def x25519_public_from_hex(value: str) -> x25519.X25519PublicKey:
    """Parse a hex-encoded raw X25519 public key."""
    try:
        return x25519.X25519PublicKey.from_public_bytes(bytes.fromhex(value.strip()))
    except ValueError as exc:
        raise KeyFileError(f"not a hex-encoded X25519 public key: {exc}") from None


def write_public(path: Path, hex_value: str) -> None:
    """Write a hex public key file (world-readable is fine for public keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hex_value + "\n")


def read_secret(path: Path) -> str:
    """Read a secret (password, token) from a file, stripped; refuses loose permissions."""
    return _read_private(path).decode().strip()


def write_secret(path: Path, value: str) -> None:
    """Write a secret file with mode 0600."""
    _write_private(path, value.encode() + b"\n")


# -- the trainer's HPKE key ----------------------------------------------------------------
Kem = Literal["x25519", "mlkem768-x25519"]
KEM_X25519: Kem = "x25519"
KEM_MLKEM768_X25519: Kem = "mlkem768-x25519"
KEMS: tuple[Kem, ...] = (KEM_X25519, KEM_MLKEM768_X25519)
_MLKEM768_PUBLIC_LEN = 1184
_X25519_LEN = 32
_PEM_BLOCK = re.compile(rb"-----BEGIN PRIVATE KEY-----.+?-----END PRIVATE KEY-----\s*", re.S)


@dataclass(frozen=True)
class HpkeKey:
    """The trainer's HPKE private key: its KEM, the key updates are opened with, and the
    text of its public file (what edges read)."""

    kem: Kem
    private: RecipientPrivateKey
    public_text: str


def _hybrid(mk: mlkem.MLKEM768PrivateKey, xk: x25519.X25519PrivateKey) -> HpkeKey:
    raw = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
    return HpkeKey(
        KEM_MLKEM768_X25519,
        hpke.MLKEM768X25519PrivateKey(mk, xk),
        f"{KEM_MLKEM768_X25519} {raw.hex()}",
    )


def _check_kem(kem: str) -> Kem:
    for known in KEMS:
        if kem == known:
            return known
    raise KeyFileError(f"unknown HPKE KEM {kem!r}; known: {', '.join(KEMS)}")


def generate_hpke_key(path: Path, kem: str = KEM_X25519) -> HpkeKey:
    """Create the trainer's HPKE private key file (0600) for ``kem``."""
    if _check_kem(kem) == KEM_X25519:
        xk = generate_x25519(path)
        return HpkeKey(KEM_X25519, xk, public_hex(xk))
    mk, xk = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    _write_private(path, _pem(mk) + _pem(xk))
    return _hybrid(mk, xk)


def load_hpke_key(path: Path, kem: str | None = None) -> HpkeKey:
    """Load the trainer's HPKE private key file; with ``kem``, refuse a key of another KEM
    (a hybrid setting never falls back to an X25519 file, nor the reverse)."""
    blocks = _PEM_BLOCK.findall(_read_private(path))
    keys = [serialization.load_pem_private_key(b, password=None) for b in blocks]
    kinds = [type(k).__name__ for k in keys]
    if len(keys) == 1 and isinstance(keys[0], x25519.X25519PrivateKey):
        found = HpkeKey(KEM_X25519, keys[0], public_hex(keys[0]))
    elif (
        len(keys) == 2
        and isinstance(keys[0], mlkem.MLKEM768PrivateKey)
        and isinstance(keys[1], x25519.X25519PrivateKey)
    ):
        found = _hybrid(keys[0], keys[1])
    else:
        raise KeyFileError(
            f"{path} holds {kinds or 'no PEM private key'}: not an HPKE key "
            f"(x25519: one X25519 key; mlkem768-x25519: an ML-KEM-768 then an X25519 key)"
        )
    if kem is not None and found.kem != _check_kem(kem):
        raise KeyFileError(
            f"{path} holds an HPKE key of KEM {found.kem}; the settings select {kem}"
        )
    return found


def parse_hpke_public(text: str) -> RecipientPublicKey:
    """The recipient key of an HPKE public file's text: ``<hex>`` (X25519) or
    ``<kem> <hex>``."""
    parts = text.split()
    if len(parts) not in (1, 2):
        raise KeyFileError("an HPKE public key is '<hex>' or '<kem> <hex>'")
    kem = _check_kem(parts[0]) if len(parts) == 2 else KEM_X25519
    try:
        raw = bytes.fromhex(parts[-1])
        if kem == KEM_X25519:
            return x25519.X25519PublicKey.from_public_bytes(raw)
        if len(raw) != _MLKEM768_PUBLIC_LEN + _X25519_LEN:
            raise ValueError(f"{len(raw)} bytes, expected {_MLKEM768_PUBLIC_LEN} + {_X25519_LEN}")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC_LEN]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC_LEN:]),
        )
    except ValueError as exc:
        raise KeyFileError(f"not a hex-encoded {kem} public key: {exc}") from None


def read_hpke_public(path: Path) -> RecipientPublicKey:
    """The trainer's HPKE public key from its file, of the KEM the file names."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KeyFileError(f"HPKE public key file {path} does not exist") from None
    return parse_hpke_public(text)
