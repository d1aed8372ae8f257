"""Signed model artifacts: a version directory plus ``manifest.json``.

The manifest lists the SHA-256 of every file, the model, version, parent version and
round, and carries the trainer's Ed25519 signature over its canonical JSON. An edge
verifies the signature against the trainer key it trusts (never a key the artifact
names), refuses symlinks, unlisted files and unsafe names, checks every digest, and
refuses ONNX models that refer to external data, before anything reaches the Triton
model repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = 1
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_MAX_MANIFEST = 64 * 1024


@dataclass(frozen=True)
class Manifest:
    """What a signed version directory contains."""

    model: str
    version: int
    parent_version: int | None
    round: int | None
    files: dict[str, str]  # file name -> SHA-256 hex
    format: int = FORMAT

    def canonical(self) -> bytes:
        """The exact bytes that are signed."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _regular_files(directory: Path) -> list[str]:
    names = []
    for entry in os.scandir(directory):
        mode = entry.stat(follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactError("unsafe-path", f"{entry.name!r} is not a regular file")
        if not SAFE_NAME.match(entry.name):
            raise ArtifactError("unsafe-path", f"file name {entry.name!r} is not allowed")
        names.append(entry.name)
    return sorted(names)


def sign_version_dir(
    directory: Path,
    key: ed25519.Ed25519PrivateKey,
    *,
    model: str,
    version: int,
    parent_version: int | None = None,
    round_no: int | None = None,
) -> Manifest:
    """Hash every file in ``directory``, sign the manifest, write ``manifest.json``."""
    files = {n: sha256_file(directory / n) for n in _regular_files(directory) if n != MANIFEST}
    manifest = Manifest(model, version, parent_version, round_no, files)
    body = {"manifest": asdict(manifest), "signature": key.sign(manifest.canonical()).hex()}
    (directory / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return manifest


_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"model", "version", "parent_version", "round", "files", "format"}


def _int_or_none(value: object, name: str, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer")
    return value


def _strict_manifest(fields: object) -> Manifest:
    """The manifest exactly as it was signed: known fields, exact types, nothing else.

    Lenient parsing (``"3"`` or ``3.0`` for 3, upper-case hex) would let bytes that were
    never signed verify; every signed value has one spelling.
    """
    if type(fields) is not dict or set(fields) != _FIELDS:
        raise ValueError(f"manifest fields must be exactly {sorted(_FIELDS)}")
    files = fields["files"]
    if type(files) is not dict or not all(
        type(k) is str and type(v) is str and _DIGEST.fullmatch(v) for k, v in files.items()
    ):
        raise ValueError("files must map names to lowercase SHA-256 hex digests")
    if type(fields["model"]) is not str:
        raise ValueError("model must be a string")
    return Manifest(
        model=fields["model"],
        version=_int_or_none(fields["version"], "version", optional=False) or 0,
        parent_version=_int_or_none(fields["parent_version"], "parent_version", optional=True),
        round=_int_or_none(fields["round"], "round", optional=True),
        files=dict(files),
        format=_int_or_none(fields["format"], "format", optional=False) or 0,
    )


def _parse_manifest(directory: Path) -> tuple[Manifest, bytes]:
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtifactError("missing-manifest", f"{directory} has no {MANIFEST}")
    if path.stat().st_size > _MAX_MANIFEST:
        raise ArtifactError("malformed", f"{MANIFEST} is larger than {_MAX_MANIFEST} bytes")
    try:
        body = json.loads(path.read_text())
        manifest = _strict_manifest(body["manifest"])
        signature_hex = body["signature"]
        if type(signature_hex) is not str or not _SIGNATURE.fullmatch(signature_hex):
            raise ValueError("signature must be 128 lowercase hex characters")
        signature = bytes.fromhex(signature_hex)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError("malformed", f"{MANIFEST} cannot be parsed: {exc}") from None
    if manifest.format != FORMAT:
        raise ArtifactError("malformed", f"manifest format {manifest.format} is not {FORMAT}")
    return manifest, signature


def read_signed_manifest(
    directory: Path,
    trusted: ed25519.Ed25519PublicKey,
    *,
    model: str | None = None,
    version: int | None = None,
) -> Manifest:
    """The manifest of ``directory``, its signature (and model, version) checked, its
    files not: what a version claims (its parent, its digests), not that its files hold it."""
    manifest, signature = _parse_manifest(directory)
    try:
        trusted.verify(signature, manifest.canonical())
    except InvalidSignature:
        raise ArtifactError(
            "bad-signature", f"{directory}: not signed by the trusted key"
        ) from None
    if model is not None and manifest.model != model:
        raise ArtifactError("malformed", f"manifest is for model {manifest.model!r}, not {model!r}")
    if version is not None and manifest.version != version:
        raise ArtifactError(
            "malformed", f"manifest is for version {manifest.version}, not {version}"
        )
    return manifest


def verify_version_dir(
    directory: Path,
    trusted: ed25519.Ed25519PublicKey,
    *,
    model: str | None = None,
    version: int | None = None,
    check_onnx: bool = True,
    unhashed: frozenset[str] = frozenset(),
) -> Manifest:
    """Verify signature, file list and every digest; return the manifest or raise.

    ``check_onnx=False`` leaves out :func:`check_self_contained` (which parses each ONNX
    file whole: the model's size in memory again), for a caller that checked its own
    export before signing it (the trainer does, in its export child). ``unhashed``: files
    whose digest the caller checks itself, from the descriptor it goes on reading
    (:func:`fedcore.params.load_signed_weights`: what it maps is what it hashed)."""
    manifest = read_signed_manifest(directory, trusted, model=model, version=version)
    present = set(_regular_files(directory)) - {MANIFEST}
    for name in manifest.files:
        if not SAFE_NAME.match(name):
            raise ArtifactError("unsafe-path", f"manifest lists unsafe name {name!r}")
    if extra := sorted(present - set(manifest.files)):
        raise ArtifactError("unlisted-file", f"files not in the manifest: {extra}")
    if missing := sorted(set(manifest.files) - present):
        raise ArtifactError("missing-file", f"files in the manifest but absent: {missing}")
    for name, digest in manifest.files.items():
        if name not in unhashed and sha256_file(directory / name) != digest:
            raise ArtifactError("digest-mismatch", f"{name}: SHA-256 differs from the manifest")
    for name in manifest.files if check_onnx else ():
        if name.endswith(".onnx"):
            check_self_contained(directory / name)
    return manifest


def check_self_contained(path: Path) -> None:
    """Refuse an ONNX model that refers to external data (weights in other files).

    The trainer exports every tensor inside the model file. A reference to external data
    would make ONNX Runtime read a file the manifest does not cover, or one outside the
    version directory (``../../etc/passwd``, an absolute path): refused whatever it names.
    A file that does not parse as ONNX is left to Triton's load to refuse.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError: no model, so no reference to follow either
        return  # (Triton's load refuses it, and the edge keeps serving what it had)
    for tensor in _onnx_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            where = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise ArtifactError(
                "external-data",
                f"{path.name}: tensor {tensor.name!r} refers to external data {where!r}",
            )


def _onnx_tensors(model: Any) -> Iterator[Any]:
    """Every tensor of an ONNX model: initializers, sparse ones, and the tensors in node
    attributes, in subgraphs and in local functions."""
    graphs, nodes = [model.graph], [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            for sparse in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
                yield from (sparse.values, sparse.indices)
            graphs.extend([attr.g] if attr.HasField("g") else [])
            graphs.extend(attr.graphs)


def install_version(
    source: Path, model_dir: Path, trusted: ed25519.Ed25519PublicKey, *, version: int
) -> Manifest:
    """Verify ``source`` and place it at ``model_dir/<version>`` atomically.

    Files are copied to a staging directory beside the model directory, verified again
    there (the copy is what Triton will read), then renamed into place.
    """
    manifest = verify_version_dir(source, trusted, model=model_dir.name, version=version)
    staging_root = model_dir.parent / ".staging"
    staging = staging_root / f"{model_dir.name}-{version}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in (*manifest.files, MANIFEST):
        shutil.copyfile(source / name, staging / name, follow_symlinks=False)
    verify_version_dir(staging, trusted, model=model_dir.name, version=version)
    target = model_dir / str(version)
    if target.exists():
        shutil.rmtree(target)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return manifest


def staging_dir(directory: Path) -> Path:
    """A new empty directory beside ``directory`` to write a version in, which
    :func:`seal_version_dir` then renames into place. A released version (its manifest
    present) is refused: it is never written again."""
    if (directory / MANIFEST).exists():
        raise ArtifactError("exists", f"{directory} is a released version, never rewritten")
    directory.parent.mkdir(parents=True, exist_ok=True)
    name = f".{directory.name}.staging."
    return Path(tempfile.mkdtemp(prefix=name, dir=directory.parent))


def seal_version_dir(staging: Path, directory: Path) -> None:
    """Make the files of the signed ``staging`` read-only (0440), rename it to
    ``directory`` and make that 0550 (the artifacts directory's 0750 less its write bit):
    a released version's files are new inodes, never written again in place, so a
    reader that mapped one keeps what it verified. A
    ``directory`` without a manifest (a write that never finished: never read) is
    replaced; a released one refused."""
    for entry in os.scandir(staging):
        if not entry.is_file(follow_symlinks=False):
            raise ArtifactError("unsafe-path", f"{entry.name!r} is not a regular file")
        os.chmod(entry.path, 0o440)
    if (directory / MANIFEST).exists():
        raise ArtifactError("exists", f"{directory} is a released version, never rewritten")
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    os.rename(staging, directory)
    os.chmod(directory, 0o550)  # noqa: S103 (owner and group read it, as its parent)
    dir_fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
