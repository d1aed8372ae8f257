"""Key files: private keys are 0600 and loose permissions are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedcore.errors import KeyFileError
from fedcore.keys import (
    ed25519_public_from_hex,
    generate_ed25519,
    generate_x25519,
    load_ed25519,
    load_x25519,
    public_hex,
    read_secret,
    write_secret,
)


def test_private_keys_are_owner_only_and_round_trip(tmp_path: Path) -> None:
    key = generate_ed25519(tmp_path / "k" / "id.key")
    assert stat.S_IMODE((tmp_path / "k" / "id.key").stat().st_mode) == 0o600
    assert public_hex(load_ed25519(tmp_path / "k" / "id.key")) == public_hex(key)
    pub = ed25519_public_from_hex(public_hex(key))
    pub.verify(key.sign(b"m"), b"m")
    x = generate_x25519(tmp_path / "x.key")
    assert public_hex(load_x25519(tmp_path / "x.key")) == public_hex(x)


def test_loose_permissions_and_wrong_types_are_refused(tmp_path: Path) -> None:
    generate_ed25519(tmp_path / "id.key")
    os.chmod(tmp_path / "id.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_ed25519(tmp_path / "id.key")
    generate_x25519(tmp_path / "x.key")
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_ed25519(tmp_path / "x.key")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_ed25519(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="not a hex-encoded"):
        ed25519_public_from_hex("zz")


def test_secrets_are_owner_only(tmp_path: Path) -> None:
    write_secret(tmp_path / "s", "hunter2")
    assert read_secret(tmp_path / "s") == "hunter2"
    os.chmod(tmp_path / "s", 0o640)
    with pytest.raises(KeyFileError):
        read_secret(tmp_path / "s")
