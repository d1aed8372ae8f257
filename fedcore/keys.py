"""Key files: Ed25519 identities and signing keys, X25519 HPKE keys.

Private keys are PEM (PKCS#8, unencrypted) files written with mode 0600; loading a
private key file readable by group or others is refused. Public keys are raw 32-byte
values, hex-encoded, so they fit in registries and NATS KV values.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

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


def _pem(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
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
