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
import json
from pathlib import Path

from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from fedcore.artifact import MANIFEST, SAFE_NAME
from fedcore.errors import ArtifactError
from fedcore.replicas import creation_error, ensure_replicas

MODELS_BUCKET = "fedgate_models"


def object_name(model: str, version: int, file: str) -> str:
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
    bucket is created or scaled up to ``replicas`` first."""
    store = await models_bucket(js, create=True, replicas=replicas)
    total = 0
    names = await asyncio.to_thread(_regular_names, directory)
    for name in names:
        data = await asyncio.to_thread((directory / name).read_bytes)
        await store.put(object_name(model, version, name), data)
        total += len(data)
    return total


def _regular_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink())


async def _get(store: ObjectStore, name: str, limit: int) -> bytes:
    try:
        info = await store.get_info(name)
    except ObjectNotFoundError:
        raise ArtifactError("missing-file", f"object {name!r} is not in {MODELS_BUCKET}") from None
    if info.size is not None and info.size > limit:
        raise ArtifactError("malformed", f"object {name!r} is {info.size} bytes, limit {limit}")
    result = await store.get(name)
    data = result.data or b""
    if len(data) > limit:
        raise ArtifactError("malformed", f"object {name!r} is {len(data)} bytes, limit {limit}")
    return data


async def download_version(
    js: JetStreamContext, model: str, version: int, dest: Path, *, max_bytes: int = 256 << 20
) -> Path:
    """Fetch one version into ``dest`` (created, must not exist). Verify it afterwards."""
    store = await models_bucket(js, create=False)
    manifest_bytes = await _get(store, object_name(model, version, MANIFEST), 64 * 1024)
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
        data = await _get(store, object_name(model, version, name), budget)
        budget -= len(data)
        await asyncio.to_thread((dest / name).write_bytes, data)
    await asyncio.to_thread((dest / MANIFEST).write_bytes, manifest_bytes)
    return dest
