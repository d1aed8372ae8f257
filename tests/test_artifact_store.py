"""Model versions through a real NATS object store: round trip, then verification."""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest

from fedcore.artifact import verify_version_dir
from fedcore.artifact_store import (
    download_version,
    model_object_name,
    models_bucket,
    upload_version,
)
from fedcore.errors import ArtifactError
from fedcore.keys import ed25519_public_from_hex
from tests.conftest import NatsServer, SignedArtifacts


async def test_upload_download_verify(
    nats_server: NatsServer, signed_v1: SignedArtifacts, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    js = nc.jetstream()
    try:
        src = signed_v1.artifacts / "digits" / "1"
        stored = await upload_version(js, "digits", 1, src)
        assert stored == sum(p.stat().st_size for p in src.iterdir())
        got = await download_version(js, "digits", 1, tmp_path / "v1")
        verify_version_dir(
            got, ed25519_public_from_hex(signed_v1.public_hex), model="digits", version=1
        )
        with pytest.raises(ArtifactError) as info:
            await download_version(js, "digits", 1, tmp_path / "small", max_bytes=100)
        assert info.value.reason == "malformed"
        # a tampered object downloads but fails verification
        store = await models_bucket(js, create=False)
        await store.put(model_object_name("digits", 1, "model.py"), b"import os\n")
        bad = await download_version(js, "digits", 1, tmp_path / "bad")
        with pytest.raises(ArtifactError) as info:
            verify_version_dir(bad, ed25519_public_from_hex(signed_v1.public_hex))
        assert info.value.reason == "digest-mismatch"
        # a manifest naming a traversal path is refused before anything is fetched
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["manifest"]["files"]["../../etc/x"] = "0" * 64
        await store.put(
            model_object_name("digits", 2, "manifest.json"), json.dumps(manifest).encode()
        )
        with pytest.raises(ArtifactError) as info:
            await download_version(js, "digits", 2, tmp_path / "trav")
        assert info.value.reason == "unsafe-path"
        assert not (tmp_path / "trav").exists()
        with pytest.raises(ArtifactError) as info:
            await download_version(js, "digits", 9, tmp_path / "none")
        assert info.value.reason == "missing-file"
    finally:
        await nc.close()
