"""Signed artifacts: anything but an untouched, trusted version directory is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.artifact import MANIFEST, install_version, sign_version_dir, verify_version_dir
from fedcore.errors import ArtifactError

KEY = ed25519.Ed25519PrivateKey.generate()
TRUSTED = KEY.public_key()


def make_version(root: Path, version: int = 3) -> Path:
    d = root / "src" / "digits" / str(version)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\x08\x07onnx-bytes" * 100)
    (d / "model.py").write_text("# model\n")
    sign_version_dir(d, KEY, model="digits", version=version, parent_version=2, round_no=5)
    return d


def test_signed_directory_verifies(tmp_path: Path) -> None:
    d = make_version(tmp_path)
    manifest = verify_version_dir(d, TRUSTED, model="digits", version=3)
    assert manifest.parent_version == 2 and manifest.round == 5
    assert set(manifest.files) == {"model.onnx", "model.py"}


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d: (d / "model.onnx").write_bytes(b"evil"), "digest-mismatch"),
        (lambda d: (d / "model.py").write_text("import os; os.system('x')\n"), "digest-mismatch"),
        (lambda d: (d / "extra.py").write_text("x"), "unlisted-file"),
        (lambda d: (d / "model.py").unlink(), "missing-file"),
        (lambda d: (d / MANIFEST).unlink(), "missing-manifest"),
        (lambda d: (d / MANIFEST).write_text("{"), "malformed"),
        (lambda d: os.symlink("/etc/passwd", d / "weights.bin"), "unsafe-path"),
    ],
)
def test_tampering_is_refused(tmp_path: Path, tamper, reason: str) -> None:
    d = make_version(tmp_path)
    tamper(d)
    with pytest.raises(ArtifactError) as info:
        verify_version_dir(d, TRUSTED)
    assert info.value.reason == reason


def test_edited_manifest_breaks_the_signature(tmp_path: Path) -> None:
    d = make_version(tmp_path)
    body = json.loads((d / MANIFEST).read_text())
    body["manifest"]["version"] = 4
    (d / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(ArtifactError) as info:
        verify_version_dir(d, TRUSTED)
    assert info.value.reason == "bad-signature"


def test_wrong_signer_is_refused(tmp_path: Path) -> None:
    d = make_version(tmp_path)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ArtifactError) as info:
        verify_version_dir(d, other)
    assert info.value.reason == "bad-signature"


def test_manifest_listing_a_traversal_path_is_refused(tmp_path: Path) -> None:
    d = make_version(tmp_path)
    (d / "model.py").unlink()
    body = json.loads((d / MANIFEST).read_text())
    files = body["manifest"]["files"]
    files["../model.py"] = files.pop("model.py")
    from fedcore.artifact import Manifest

    m = Manifest(**body["manifest"])
    body["signature"] = KEY.sign(m.canonical()).hex()  # even correctly signed
    (d / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(ArtifactError) as info:
        verify_version_dir(d, TRUSTED)
    assert info.value.reason == "unsafe-path"


def test_install_places_a_verified_copy_and_refuses_bad_ones(tmp_path: Path) -> None:
    d = make_version(tmp_path)
    model_dir = tmp_path / "repo" / "digits"
    install_version(d, model_dir, TRUSTED, version=3)
    assert sorted(p.name for p in (model_dir / "3").iterdir()) == [
        MANIFEST,
        "model.onnx",
        "model.py",
    ]
    bad = make_version(tmp_path / "b", version=4)
    (bad / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactError):
        install_version(bad, model_dir, TRUSTED, version=4)
    assert not (model_dir / "4").exists()  # nothing reached the repository
    with pytest.raises(ArtifactError, match="version 3, not 5"):
        install_version(d, model_dir, TRUSTED, version=5)
    shutil.rmtree(model_dir)
