"""Rollouts on the edge: serve the versions the gateway's desired state names.

The gateway writes :class:`~fedcore.wire.DesiredVersions` to the KV bucket
``fedgate_desired`` (key ``<model>``); :class:`RolloutApplier` watches it and, per model,
reconciles the Triton repository with it:

1. every desired version not in the repository is downloaded from the object store into
   a scratch directory, verified against the trainer key this edge trusts (signature,
   file list, every SHA-256) and only then installed (:func:`fedcore.artifact.install_version`
   verifies the copy again) and loaded through Triton's repository API next to the
   version already serving, which keeps serving throughout; a corrupt or unsigned
   artifact is refused and nothing reaches the repository;
2. versions no longer desired are removed from the repository and the model is loaded
   again: Triton unloads them once their in-flight requests finish (the whole model is
   never unloaded, and a model is never left without a version).

Refusals and load failures are reported with their reason in the heartbeat's ``failed``
map, with the rollout id the edge has applied (:meth:`RolloutApplier.annotate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import shutil
import threading
import urllib.request
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import nats.errors
import nats.js.errors
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from edge_runtime.errors import ModelLoadError
from edge_runtime.label_tally import tally_labels
from edge_runtime.settings import EdgeSettings
from edge_runtime.spool import spool_path
from edge_runtime.triton import TritonServer
from fedcore.artifact import install_version, verify_version_dir
from fedcore.artifact_store import download_version
from fedcore.errors import ArtifactError
from fedcore.models import get_spec
from fedcore.wire import DESIRED_BUCKET, DesiredVersions, LabelTally, ModelState, WireError

log = logging.getLogger(__name__)

Tally = Callable[[str, Collection[int]], dict[int, LabelTally]]
"""Label tallies of a model's versions (``{}`` when there are none)."""
Warm = Callable[[str, int], None]
"""Sends a loaded version its first requests (raises :class:`WarmUpError` if it fails them)."""
WARMUP_REQUESTS = 5


class WarmUpError(Exception):
    """A freshly loaded version did not answer its warm-up requests."""


class Transient(Exception):
    """A step that may succeed when tried again (NATS unreachable, Triton busy)."""


def repository_versions(model_dir: Path) -> set[int]:
    """Version directories of one model in the Triton repository."""
    if not model_dir.is_dir():
        return set()
    return {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}


class RolloutApplier:
    """Follows ``fedgate_desired`` for ``models`` and applies it to the local Triton."""

    def __init__(
        self,
        *,
        models: Sequence[str],
        repository: Path,
        work_dir: Path,
        trusted: ed25519.Ed25519PublicKey,
        load: Callable[[str], None],
        tally: Tally | None = None,
        warm: Warm | None = None,
        retry_s: float = 2.0,
        max_artifact_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.models = list(models)
        self.max_artifact_bytes = max_artifact_bytes
        self.repository = repository
        self.work_dir = work_dir
        self.trusted = trusted
        self.load = load
        self.tally = tally
        self.warm = warm
        self.retry_s = retry_s
        self._js: JetStreamContext | None = None
        self._latest: dict[str, DesiredVersions] = {}
        self._wake = {m: asyncio.Event() for m in self.models}
        self._applied: dict[str, DesiredVersions] = {}
        self._failed: dict[str, dict[int, str]] = {}
        self._refused: dict[tuple[str, int], str] = {}
        self._guard = threading.Lock()  # annotate() runs in the heartbeat's thread
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, nc: NATS) -> None:
        """Watch the desired versions and reconcile each model in its own task."""
        self._js = nc.jetstream()
        self._tasks.append(asyncio.create_task(self._watch(self._js)))
        self._tasks += [asyncio.create_task(self._worker(m)) for m in self.models]

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching; a reconcile in progress gets ``timeout_s`` to finish. Idempotent."""
        self._stop.set()
        for event in self._wake.values():
            event.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            self._tasks.clear()

    def resync(self) -> None:
        """Reconcile every model with its desired state again (after Triton restarted:
        a desired version that no longer verified on disk is fetched again)."""
        for model, event in self._wake.items():
            if model in self._latest:
                event.set()

    # -- what the heartbeat says ---------------------------------------------------------
    def annotate(self, states: dict[str, ModelState]) -> dict[str, ModelState]:
        """The heartbeat's model states with the applied rollout, its refusals and failures,
        and (while a candidate is desired) per-version label tallies. Thread-safe."""
        out = dict(states)
        for model, state in states.items():
            with self._guard:
                applied = self._applied.get(model)
                failed = dict(self._failed.get(model, {}))
            if applied is None:
                continue
            merged = {v: r for v, r in state.failed.items() if r != "unloaded"} | failed
            labels = state.labels
            if applied.candidate is not None and self.tally is not None:
                labels = self.tally(model, applied.versions())
            out[model] = state.model_copy(
                update={"rollout": applied.rollout, "failed": merged, "labels": labels}
            )
        return out

    # -- following the desired state -----------------------------------------------------
    def offer(self, key: str, value: bytes | None, deleted: bool) -> None:
        """Take one KV entry; wakes the model's worker when it is one of ours."""
        if key not in self._wake or deleted or not value:
            return
        try:
            desired = DesiredVersions.decode(value)
        except WireError as exc:
            log.warning("ignored desired versions: %s", exc, extra={"model": key})
            return
        if desired.model != key:
            log.warning("ignored desired versions filed under another model's key")
            return
        self._latest[key] = desired
        self._wake[key].set()

    async def _watch(self, js: JetStreamContext) -> None:
        while not self._stop.is_set():
            try:
                kv = await js.key_value(DESIRED_BUCKET)
                watcher = await kv.watchall()
            except (nats.js.errors.BucketNotFoundError, nats.errors.Error, TimeoutError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.retry_s)
                continue
            try:
                while not self._stop.is_set():
                    try:
                        entry = await watcher.updates(timeout=self.retry_s)  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        continue
                    if entry is not None:
                        self.offer(entry.key, entry.value, entry.operation in ("DEL", "PURGE"))
            except nats.errors.Error as exc:
                log.warning("desired versions watch interrupted: %r; watching again", exc)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def _worker(self, model: str) -> None:
        wake = self._wake[model]
        while not self._stop.is_set():
            await wake.wait()
            wake.clear()
            desired = self._latest.get(model)
            if self._stop.is_set() or desired is None:
                continue
            try:
                await self.apply(desired)
            except Transient as exc:
                log.warning("rollout of %s not applied yet: %s", model, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.retry_s)
                wake.set()
            except Exception:
                log.exception("rollout of %s failed", model, extra={"model": model})

    # -- reconciling ---------------------------------------------------------------------
    async def apply(self, desired: DesiredVersions) -> None:
        """Make the repository (and Triton) serve ``desired``; raises :class:`Transient`."""
        model = desired.model
        model_dir = self.repository / model
        present = repository_versions(model_dir)
        wanted = set(desired.versions())
        failed: dict[int, str] = {}
        added = await self._add(desired, sorted(wanted - present), failed)
        keep = (present | set(added)) & wanted
        dropped = sorted(present - wanted) if keep else []
        if dropped:
            for version in dropped:
                await asyncio.to_thread(shutil.rmtree, model_dir / str(version), True)
            await self._load(model)
            log.info(
                "dropped %s versions %s",
                model,
                dropped,
                extra={"model": model, "rollout": desired.rollout},
            )
        # this rollout's refusals stay reported after the gateway stops asking for them
        self._refused = {k: why for k, why in self._refused.items() if k[0] == desired.rollout}
        failed |= {v: why for (_, v), why in self._refused.items() if v not in failed}
        with self._guard:
            self._applied[model] = desired
            self._failed[model] = failed

    async def _add(
        self, desired: DesiredVersions, versions: list[int], failed: dict[int, str]
    ) -> list[int]:
        """Fetch, verify, install and load ``versions``; refusals go into ``failed``."""
        model, added = desired.model, []
        for version in versions:
            known = self._refused.get((desired.rollout, version))
            if known is not None:
                failed[version] = known
                continue
            try:
                await self._install(model, version)
            except ArtifactError as exc:
                self._refuse(desired, version, f"refused: {exc.reason}: {exc.detail}", failed)
                continue
            added.append(version)
        if not added:
            return added
        try:
            await self._load(model)
            for version in added:
                if self.warm is not None:
                    await asyncio.to_thread(self.warm, model, version)
        except (ModelLoadError, WarmUpError) as exc:
            why = f"load failed: {exc.reason}" if isinstance(exc, ModelLoadError) else str(exc)
            for version in added:
                self._refuse(desired, version, why, failed)
                await asyncio.to_thread(shutil.rmtree, self.repository / model / str(version), True)
            if isinstance(exc, WarmUpError):
                await self._load(model)  # unload what loaded but cannot serve
            return []
        log.info("loaded %s versions %s", model, added, extra={"model": model})
        return added

    def _refuse(
        self, desired: DesiredVersions, version: int, reason: str, failed: dict[int, str]
    ) -> None:
        self._refused[(desired.rollout, version)] = reason
        failed[version] = reason
        log.warning(
            "version %d of %s not served: %s",
            version,
            desired.model,
            reason,
            extra={"model": desired.model, "version": version, "rollout": desired.rollout},
        )

    async def _install(self, model: str, version: int) -> None:
        """Download into scratch space, verify, then install into the repository."""
        if self._js is None:
            raise Transient("not connected to NATS")
        scratch = self.work_dir / f"incoming-{model}-{version}-{secrets.token_hex(4)}"
        await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True)
        try:
            try:
                await download_version(
                    self._js, model, version, scratch, max_bytes=self.max_artifact_bytes
                )
            except nats.js.errors.BucketNotFoundError:
                raise ArtifactError(
                    "missing-file", "the model store has no models bucket"
                ) from None
            except (nats.errors.Error, TimeoutError) as exc:
                raise Transient(f"download of {model} version {version}: {exc!r}") from None
            try:
                await asyncio.to_thread(
                    verify_version_dir, scratch, self.trusted, model=model, version=version
                )
            except ArtifactError as exc:  # name the version, not the scratch directory
                detail = exc.detail.replace(str(scratch), f"{model} version {version}")
                raise ArtifactError(exc.reason, detail) from None
            await asyncio.to_thread(
                install_version, scratch, self.repository / model, self.trusted, version=version
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    async def _load(self, model: str) -> None:
        try:
            await asyncio.to_thread(self.load, model)
        except OSError as exc:
            raise Transient(f"Triton unreachable: {exc}") from None


def warm_up(url: str, model: str, version: int, requests: int = WARMUP_REQUESTS) -> None:
    """Send ``version`` a few one-row requests of zeros (its first runs are the slow ones),
    so that the traffic the gates observe does not pay for them. Raises :class:`WarmUpError`."""
    inputs = get_spec(model).inputs
    if any(t.datatype == "BYTES" for t in inputs):
        return
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": t.name,
                    "shape": [1, *t.shape],
                    "datatype": t.datatype,
                    "data": [0] * int(np.prod(t.shape)),
                }
                for t in inputs
            ]
        }
    ).encode()
    path = f"{url}/v2/models/{model}/versions/{version}/infer"
    for _ in range(requests):
        req = urllib.request.Request(path, data=body, method="POST")  # noqa: S310 - our own Triton
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                resp.read()
        except (OSError, ValueError) as exc:
            raise WarmUpError(f"warm-up failed: version {version} of {model}: {exc}") from None


def build_applier(
    settings: EdgeSettings,
    repository: Path,
    trusted: ed25519.Ed25519PublicKey,
    triton: TritonServer,
) -> RolloutApplier:
    """The edge's applier: scratch space under the data directory, tallies from its spools."""

    def tally(model: str, versions: Collection[int]) -> dict[int, LabelTally]:
        return tally_labels(spool_path(settings.data_dir, model), model, versions)

    return RolloutApplier(
        models=settings.models,
        repository=repository,
        work_dir=settings.data_dir / "rollout",
        trusted=trusted,
        load=triton.load,
        tally=tally,
        warm=functools.partial(warm_up, triton.url),
        max_artifact_bytes=settings.max_artifact_bytes,
    )
