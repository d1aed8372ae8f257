"""Signed model versions in the NATS object store: the trainer uploads, edges download.

Objects are named ``<model>/<version>/<file>`` in the bucket ``fedgate_models``. A
download reads ``manifest.json`` first and fetches only the files it lists (names checked
against the same safe pattern the verifier uses) into a fresh directory, with a size
limit; the caller then verifies the directory with :func:`fedcore.artifact.verify_version_dir`
before anything reaches a model repository. The object store's own SHA-256 digest
guards each object in transit; the signed manifest guards what the trainer meant.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from fedcore.artifact import MANIFEST, SAFE_NAME
from fedcore.errors import ArtifactError
from fedcore.replicas import creation_error, ensure_replicas

MODELS_BUCKET = "fedgate_models"
_MAX_CHUNK = 1024 * 1024


def model_object_name(model: str, version: int, file: str) -> str:
    """The object store name of one file of one version."""
    return f"{model}/{version}/{file}"


async def models_bucket(js: JetStreamContext, *, create: bool, replicas: int = 1) -> ObjectStore:
    """The models bucket; when ``create``, made if missing (file storage, ``replicas``) and
    scaled up to ``replicas`` if it has fewer (:func:`fedcore.replicas.ensure_replicas`)."""
    try:
        store = await js.object_store(MODELS_BUCKET)
    except BucketNotFoundError:
        if not create:
            raise
        config = ObjectStoreConfig(
            description="fedgate: signed model versions", storage=StorageType.FILE
        )
        try:
            return await js.create_object_store(MODELS_BUCKET, config.evolve(replicas=replicas))
        except APIError as exc:
            raise creation_error(f"OBJ_{MODELS_BUCKET}", replicas, exc) from None
    if create:
        await ensure_replicas(js, f"OBJ_{MODELS_BUCKET}", replicas)
    return store


async def upload_version(
    js: JetStreamContext, model: str, version: int, directory: Path, *, replicas: int = 1
) -> int:
    """Upload every file of a signed version directory; returns the bytes stored. The
    bucket is created or scaled up to ``replicas`` first. Each file is streamed from disk
    in chunks of up to 1 MiB (half the server's ``max_payload`` at most), so a large model
    is never held in memory whole."""
    store = await models_bucket(js, create=True, replicas=replicas)
    chunk = _chunk_size(js)
    total = 0
    names = await asyncio.to_thread(_regular_names, directory)
    for name in names:
        meta = ObjectMeta(name=model_object_name(model, version, name))
        meta.options = ObjectMetaOptions(max_chunk_size=chunk)
        with (directory / name).open("rb") as f:
            info = await store.put(meta.name or "", f, meta=meta)
        total += info.size or 0
    return total


def _chunk_size(js: JetStreamContext) -> int:
    max_payload = getattr(getattr(js, "_nc", None), "max_payload", 0) or 0
    return max(64 * 1024, min(_MAX_CHUNK, max_payload // 2)) if max_payload else _MAX_CHUNK // 8


def _regular_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink())


async def _info_within(store: ObjectStore, name: str, limit: int) -> int:
    try:
        info = await store.get_info(name)
    except ObjectNotFoundError:
        raise ArtifactError("missing-file", f"object {name!r} is not in {MODELS_BUCKET}") from None
    size = info.size or 0
    if size > limit:
        raise ArtifactError("malformed", f"object {name!r} is {size} bytes, limit {limit}")
    return size


async def _get(store: ObjectStore, name: str, limit: int) -> bytes:
    await _info_within(store, name, limit)
    sink = io.BytesIO()  # written into chunk by chunk (the client's default concatenates)
    await store.get(name, writeinto=sink)
    data = sink.getvalue()
    if len(data) > limit:
        raise ArtifactError("malformed", f"object {name!r} is {len(data)} bytes, limit {limit}")
    return data


async def _get_file(store: ObjectStore, name: str, limit: int, dest: Path) -> int:
    """Stream object ``name`` into the new file ``dest``; its size."""
    await _info_within(store, name, limit)
    with dest.open("xb") as f:
        await store.get(name, writeinto=f)  # digest-checked by the client
        written = f.tell()
    if written > limit:
        raise ArtifactError("malformed", f"object {name!r} is {written} bytes, limit {limit}")
    return written


async def download_version(
    js: JetStreamContext, model: str, version: int, dest: Path, *, max_bytes: int = 256 << 20
) -> Path:
    """Fetch one version into ``dest`` (created, must not exist). Verify it afterwards."""
    store = await models_bucket(js, create=False)
    manifest_bytes = await _get(store, model_object_name(model, version, MANIFEST), 64 * 1024)
    try:
        files = json.loads(manifest_bytes)["manifest"]["files"]
        names = [str(n) for n in files]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError("malformed", f"manifest of {model} v{version}: {exc}") from None
    for name in names:
        if not SAFE_NAME.match(name) or name == MANIFEST:
            raise ArtifactError("unsafe-path", f"manifest lists unsafe name {name!r}")
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=False)
    budget = max_bytes
    for name in names:
        budget -= await _get_file(
            store, model_object_name(model, version, name), budget, dest / name
        )
    await asyncio.to_thread((dest / MANIFEST).write_bytes, manifest_bytes)
    return dest
