"""A released version's weights, mapped by the trainer as its base, are the bytes it
verified: written once (temp directory renamed into place, read-only), hashed from the
descriptor that is mapped, and the newest version verified before the trainer starts."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.artifact import MANIFEST, sign_version_dir
from fedcore.errors import ArtifactError
from fedcore.files import write_atomic
from fedcore.models import get_spec
from fedcore.params import flatten, map_verified_weights
from trainer.books import build_book
from trainer.bootstrap import write_version
from trainer.serving_watch import lineage
from trainer.settings import TrainerSettings

MODEL = "digits"
NOBODY = 65534
ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys
from pathlib import Path
import numpy as np
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from trainer.serving_watch import ServingWatch

root, version = Path(sys.argv[1]), int(sys.argv[2])
trusted = load_pem_public_key((root / "trusted.pem").read_bytes())
watch = ServingWatch(None, None, root / "artifacts", trusted)  # the rebase's load
digest, params = watch._load("digits", version)
if len(sys.argv) > 3:  # as the trainer's own uid, which owns the files, from here on
    os.setgid(int(sys.argv[3]))
    os.setuid(int(sys.argv[3]))
before = float(np.sum(params, dtype=np.float64))
path = root / "artifacts" / "digits" / str(version) / "weights.npy"
refused = []
try:  # what np.save over the path does: truncate and write the same inode
    np.save(path, np.full(params.size, 1e6, dtype="<f4"), allow_pickle=False)
except PermissionError:
    refused.append("rewrite")
try:
    os.truncate(path, 4096)
except PermissionError:
    refused.append("truncate")
after = float(np.sum(params, dtype=np.float64))  # a truncated mapping: SIGBUS here
print(json.dumps({"before": before, "after": after, "refused": refused}))
"""


@pytest.fixture
def root() -> Iterator[Path]:
    """A data directory outside pytest's (0700, root's) temporary tree, so that an
    unprivileged child can reach it."""
    path = Path(tempfile.mkdtemp(prefix="fedgate-mapsafe-"))
    try:
        yield path
    finally:
        for d, _, _ in os.walk(path):  # sealed versions are 0550
            os.chmod(d, 0o700)
        shutil.rmtree(path)


def release(artifacts: Path, key: ed25519.Ed25519PrivateKey, version: int) -> np.ndarray:
    spec = get_spec(MODEL)
    params = flatten(spec.build_module()) + np.float32(version)
    parent = version - 1 if version > 1 else None
    write_version(spec, params, artifacts / MODEL / str(version), key, version=version,
                  parent_version=parent)  # fmt: skip
    return params


def settings_of(root: Path) -> TrainerSettings:
    return TrainerSettings(
        nats_user="trainer",
        nats_password_file=root / "p",
        data_dir=root,
        signing_key_file=root / "s",
        hpke_private_key_file=root / "h",
        edge_registry_file=root / "r",
    )


def test_a_released_version_is_sealed_and_never_rewritten(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    params = release(tmp_path, key, 1)
    directory = tmp_path / MODEL / "1"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o550
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["manifest.json", "model.onnx", "model.py", "weights.npy"]
    assert {stat.S_IMODE((directory / n).stat().st_mode) for n in names} == {0o440}
    assert not [p for p in (tmp_path / MODEL).iterdir() if p.name != "1"]  # no staging left
    inode = (directory / "weights.npy").stat().st_ino
    with pytest.raises(ArtifactError) as refused:
        write_version(get_spec(MODEL), params * 2, directory, key, version=1)
    assert refused.value.reason == "exists"
    assert (directory / "weights.npy").stat().st_ino == inode
    assert np.array_equal(np.load(directory / "weights.npy"), params)


def test_in_place_writes_cannot_reach_a_mapped_base(root: Path) -> None:
    """The trainer's uid (an unprivileged one, ``nobody`` when the tests run as root)
    cannot rewrite or truncate a released weights file it mapped: before, np.save over
    the path changed the base unverified and a truncation killed it with SIGBUS."""
    key = ed25519.Ed25519PrivateKey.generate()
    params = release(root / "artifacts", key, 1)
    from cryptography.hazmat.primitives import serialization

    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (root / "trusted.pem").write_bytes(pem)
    as_user: list[str] = []
    if os.geteuid() == 0:  # the trainer does not run as root: its own uid owns the files
        for d, dirs, files in os.walk(root):
            for name in [d, *(os.path.join(d, n) for n in dirs + files)]:
                os.chown(name, NOBODY, NOBODY)
        os.chmod(root, 0o750)
        as_user = [str(NOBODY)]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), "1", *as_user],
        check=False, capture_output=True, text=True, timeout=120, env=env, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, f"child died ({done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = float(np.sum(params, dtype=np.float64))
    assert result["before"] == pytest.approx(expected)
    assert result["after"] == result["before"]
    assert result["refused"] == ["rewrite", "truncate"]


def test_a_rename_over_the_file_leaves_the_book_and_a_tampered_newest_refuses_start(
    root: Path,
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    trusted = key.public_key()
    artifacts = root / "artifacts"
    release(artifacts, key, 1)
    params = release(artifacts, key, 2)
    book = build_book(settings_of(root), MODEL, trusted)
    assert book.version == 2 and np.array_equal(np.asarray(book.params), params)
    assert set(book.history) == {1, 2}
    weights = artifacts / MODEL / "2" / "weights.npy"
    os.chmod(weights.parent, 0o750)  # whoever can: a rename, as every writer here does
    forged = np.full(params.size, 1e6, dtype="<f4")
    write_atomic(weights, weights.read_bytes()[:128] + forged.tobytes(), 0o440)
    assert np.array_equal(np.asarray(book.params), params)  # the mapped inode is intact
    with pytest.raises(ArtifactError) as refused:
        build_book(settings_of(root), MODEL, trusted)
    assert refused.value.reason == "digest-mismatch"
    assert "digits version 2" in str(refused.value) and "does not start" in str(refused.value)


def test_an_unsigned_newest_version_refuses_start(root: Path) -> None:
    """Before, build_book mapped the newest version without verifying it at all."""
    key = ed25519.Ed25519PrivateKey.generate()
    artifacts = root / "artifacts"
    release(artifacts, key, 1)
    directory = artifacts / MODEL / "2"
    shutil.copytree(artifacts / MODEL / "1", directory)
    os.chmod(directory, 0o750)
    (directory / MANIFEST).unlink()
    other = ed25519.Ed25519PrivateKey.generate()
    sign_version_dir(directory, other, model=MODEL, version=2, parent_version=1)
    with pytest.raises(ArtifactError) as refused:
        build_book(settings_of(root), MODEL, key.public_key())
    assert refused.value.reason == "bad-signature"


def test_the_mapping_is_of_the_descriptor_that_was_hashed(tmp_path: Path) -> None:
    path = tmp_path / "weights.npy"
    np.save(path, np.arange(1000, dtype="<f4"), allow_pickle=False)
    from fedcore.artifact import sha256_file

    digest = sha256_file(path)
    vector = map_verified_weights(path, digest)
    assert isinstance(vector, np.memmap) and vector[999] == 999.0
    with pytest.raises(ArtifactError) as refused:
        map_verified_weights(path, "0" * 64)
    assert refused.value.reason == "digest-mismatch"
    np.save(tmp_path / "f8.npy", np.arange(10, dtype="<f8"), allow_pickle=False)
    from fedcore.errors import ModelSpecError

    with pytest.raises(ModelSpecError):
        map_verified_weights(tmp_path / "f8.npy", sha256_file(tmp_path / "f8.npy"))


def test_lineage_ends_at_a_manifest_the_trainer_did_not_sign(tmp_path: Path) -> None:
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    for version, parent, signer in [(1, None, key), (2, 1, key), (3, 2, other), (4, 3, key)]:
        directory = tmp_path / MODEL / str(version)
        directory.mkdir(parents=True)
        (directory / "model.onnx").write_bytes(b"x")
        sign_version_dir(directory, signer, model=MODEL, version=version,
                         parent_version=parent)  # fmt: skip
    assert lineage(tmp_path / MODEL, 2, key.public_key()) == [2, 1]
    assert lineage(tmp_path / MODEL, 4, key.public_key()) == [4, 3]  # 3's parent unsigned
