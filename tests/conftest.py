"""Shared fixtures: a signed version 1 of ``digits``, built once per session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedcore.keys import generate_ed25519, public_hex
from fedcore.models import get_spec


@dataclass(frozen=True)
class SignedArtifacts:
    artifacts: Path  # <artifacts>/digits/1/
    params: np.ndarray  # the flat parameters version 1 was exported from
    private_key: Path
    public_hex: str


@pytest.fixture(scope="session")
def signed_v1(tmp_path_factory: pytest.TempPathFactory) -> SignedArtifacts:
    from trainer.bootstrap import train_seed_model, write_version

    root = tmp_path_factory.mktemp("artifacts")
    key_path = root / "keys" / "signing.key"
    key = generate_ed25519(key_path)
    spec = get_spec("digits")
    params = train_seed_model(spec, fraction=0.2, epochs=3, seed=0)
    write_version(spec, params, root / "artifacts" / "digits" / "1", key, version=1)
    return SignedArtifacts(root / "artifacts", params, key_path, public_hex(key))


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry}: {cmdline.strip()}")
    return found
