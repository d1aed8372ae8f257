"""The trainer follows the version the fleet serves: after a rollback, rounds go back to it.

The trainer bases each round on its newest release. When the gateway rolls a release back
(its canary failed) or the rollout fails, edges drop that version and serve only the
stable one; a round based on the dropped version would be refused by every edge
(``base-not-served``), for ever. :class:`ServingWatch` reads the desired versions the
edges follow (KV ``fedgate_desired``, :class:`fedcore.wire.DesiredVersions`) at start and
watches them after. When a model's settled record (no candidate) says the rollout that
wrote it dropped the book's version, or one of its ancestors, the book is rebased on the
``stable`` version (:func:`follow_target` decides; :meth:`trainer.rounds.RoundBook.rebase`
does it): its parameters and digest come from the trainer's own signed artifacts,
verified first; the open round is abandoned (recorded ``failed``), its updates are not
folded, and the next release still gets a fresh version number.

Which version a rollout dropped is read from the gateway's rollout record
(``fedgate_rollouts``, key ``<model>.<rollout id>``: its ``version`` and ``stable`` fields,
as the rollout API shows them): the one of the two the fleet no longer serves. The fleet
went back when it dropped a newer version than the one it serves (a rollback, a failed
rollout, or an older version promoted by hand). A settled record that moved the fleet
forward, or whose rollout cannot be read, changes nothing: the book's newest release may
simply not have been handed to the gateway yet. The rebase itself runs in the round loop
(:meth:`ServingWatch.apply`), between rounds or in an open round that is neither closing
nor securely aggregated, so it never races a release.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from numpy.typing import NDArray

from fedcore.artifact import read_signed_manifest
from fedcore.errors import ArtifactError, FedgateError
from fedcore.kv import kv_bucket
from fedcore.params import load_signed_weights
from fedcore.wire import (
    DESIRED_BUCKET,
    ROLLOUTS_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
    Contributor,
    DesiredVersions,
    RoundRecord,
    WireError,
    round_key,
)
from trainer.driver import RoundDriver
from trainer.release import version_digest
from trainer.retry import retry_transient
from trainer.rollout_client import RolloutRequester
from trainer.rounds import OpenRound, RoundBook
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

MAX_LINEAGE = 100_000


@dataclass(frozen=True)
class Settled:
    """A model's desired versions with no candidate, and the version the rollout that
    wrote them dropped (``dropped``: None when its record could not be read)."""

    stable: int
    rollout: str
    dropped: int | None


def follow_target(
    version: int, newest: int, settled: Settled, lineage: Callable[[int], list[int]]
) -> int | None:
    """The version to rebase a book based on ``version`` (``newest`` released) on, or None.

    - the fleet serves ``version``, or a version this trainer never released: nothing;
    - it serves a newer release than ``version`` (promoted after an earlier rebase): that;
    - it serves an older one because its rollout went back from ``version`` or from an
      ancestor of it (``lineage(version)``: the version, its parent, ...): the older one;
    - otherwise (a rollout that moved forward, an unknown rollout): nothing; the release
      may still be on its way to the gateway."""
    stable = settled.stable
    if stable == version or stable > newest:
        return None
    if stable > version:
        return stable
    dropped = settled.dropped
    if dropped is None or dropped <= stable or dropped not in lineage(version):
        return None
    return stable


def lineage(model_dir: Path, version: int, trusted: ed25519.Ed25519PublicKey) -> list[int]:
    """``version`` and its ancestors, newest first, from the manifests' parents: only
    manifests signed by ``trusted`` for this model and version (the walk ends at the
    first that is not)."""
    chain: list[int] = []
    current: int | None = version
    while current is not None and current not in chain and len(chain) < MAX_LINEAGE:
        chain.append(current)
        try:
            manifest = read_signed_manifest(
                model_dir / str(current), trusted, model=model_dir.name, version=current
            )
        except (OSError, ArtifactError):
            break
        current = manifest.parent_version
    return chain


@dataclass(frozen=True)
class Rebase:
    """A rebase made ready off the round loop: the version, its digest and parameters."""

    model: str
    from_version: int
    version: int
    digest: str
    params: NDArray[Any]
    rollout: str
    dropped: int | None


class ServingWatch:
    """Reads and watches ``fedgate_desired``; rebases books in the round loop."""

    def __init__(
        self,
        js: JetStreamContext,
        driver: RoundDriver,
        artifacts_dir: Path,
        trusted: ed25519.Ed25519PublicKey,
        *,
        replicas: int = 1,
        rollouts: RolloutRequester | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self.js = js
        self.driver = driver
        self.artifacts_dir = artifacts_dir
        self.trusted = trusted
        self.replicas = replicas
        self.rollouts = rollouts
        self.retry_s = retry_s
        self.latest: dict[str, DesiredVersions] = {}
        self.ready: dict[str, Rebase] = {}
        self._unloadable: set[tuple[str, int, int]] = set()
        self._rollouts: dict[tuple[str, str], tuple[int, int]] = {}
        """(model, rollout id) -> the rollout's (version, stable), once read"""

    @classmethod
    def for_trainer(
        cls,
        settings: TrainerSettings,
        js: JetStreamContext,
        driver: RoundDriver,
        signing: ed25519.Ed25519PrivateKey,
        rollouts: RolloutRequester | None,
    ) -> ServingWatch:
        """The trainer's watch: its artifacts, checked against its own signing key."""
        return cls(
            js,
            driver,
            settings.artifacts_dir,
            signing.public_key(),
            replicas=settings.nats_replicas,
            rollouts=rollouts,
        )

    # -- reading ---------------------------------------------------------------------------
    async def start(self) -> None:
        """At start: read every model's desired versions and rebase where they call for
        it; versions off each book's lineage no longer count as async bases."""
        for model in self.driver.books:
            try:
                kv = await self.js.key_value(DESIRED_BUCKET)
                entry = await kv.get(model)
                self.offer(model, entry.value)
            except (BucketNotFoundError, KeyNotFoundError):
                pass  # no rollout yet
            except (nats.errors.Error, TimeoutError) as exc:  # the watch reads it later
                log.warning("desired versions of %s not read at start: %r", model, exc)
            await self.consider(model)
            await self.apply(model)
            self._prune(model)

    def serving(self, model: str) -> int | None:
        """The version the fleet serves of ``model`` when no rollout is under way."""
        desired = self.latest.get(model)
        return desired.stable if desired is not None and desired.candidate is None else None

    def offer(self, key: str, value: bytes | None) -> None:
        """Take one KV entry of ``fedgate_desired`` (another model's, or a bad one: ignored)."""
        if key not in self.driver.books or not value:
            return
        try:
            desired = DesiredVersions.decode(value)
        except WireError as exc:
            log.warning("ignored desired versions: %s", exc, extra={"model": key})
            return
        if desired.model == key:
            self.latest[key] = desired

    async def run(self, stop: asyncio.Event) -> None:
        """Watch ``fedgate_desired`` until ``stop``; each model is considered on every
        change and again every ``retry_s`` (a rebase waits for a release to finish)."""
        while not stop.is_set():
            try:  # the gateway's bucket: not created here (absent until its first rollout)
                kv = await self.js.key_value(DESIRED_BUCKET)
                watcher = await kv.watchall()
            except (nats.errors.Error, TimeoutError) as exc:
                if not isinstance(exc, BucketNotFoundError):
                    log.warning("desired versions not watched yet: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry_s)
                continue
            try:
                while not stop.is_set():
                    with contextlib.suppress(nats.errors.TimeoutError):
                        entry = await watcher.updates(timeout=self.retry_s)  # type: ignore[no-untyped-call]
                        if entry is not None and entry.operation not in ("DEL", "PURGE"):
                            self.offer(entry.key, entry.value)
                    for model in self.driver.books:
                        await self.consider(model)
            except nats.errors.Error as exc:
                log.warning("desired versions watch interrupted: %r; watching again", exc)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def consider(self, model: str) -> None:
        """Make a rebase of ``model`` ready when its latest settled record calls for one."""
        desired, book = self.latest.get(model), self.driver.books[model]
        if desired is None or desired.candidate is not None or desired.stable == book.version:
            return
        ready = self.ready.get(model)
        if ready is not None and ready.from_version == book.version:
            return
        settled = Settled(desired.stable, desired.rollout, await self._dropped_by(desired))
        model_dir = self.artifacts_dir / model
        target = follow_target(
            book.version, book.newest, settled, lambda v: lineage(model_dir, v, self.trusted)
        )
        if target is None or (model, book.version, target) in self._unloadable:
            return
        try:
            digest, params = await asyncio.to_thread(self._load, model, target)
        except (OSError, ValueError, FedgateError) as exc:
            self._unloadable.add((model, book.version, target))  # said once, not every second
            log.error(
                "the fleet serves version %d of %s, which cannot be loaded here: %s",
                target,
                model,
                exc,
                extra={"model": model, "rollout": desired.rollout},
            )
            return
        self.ready[model] = Rebase(
            model, book.version, target, digest, params, desired.rollout, settled.dropped
        )

    async def _dropped_by(self, desired: DesiredVersions) -> int | None:
        """The version the rollout that wrote ``desired`` dropped: of its candidate
        (``version``) and the version it replaced (``stable``), the one not served."""
        key = (desired.model, desired.rollout)
        if key not in self._rollouts:
            try:
                kv = await self.js.key_value(ROLLOUTS_BUCKET)
                entry = await kv.get(f"{desired.model}.{desired.rollout}")
                doc = json.loads(entry.value or b"")
            except (BucketNotFoundError, KeyNotFoundError, ValueError):
                return None
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("rollout %s not read: %r", desired.rollout, exc)
                return None
            pair = [doc.get(k) for k in ("version", "stable")] if isinstance(doc, dict) else []
            ints = [v for v in pair if type(v) is int]
            if len(ints) != 2:
                return None
            self._rollouts[key] = (ints[0], ints[1])
        version, replaced = self._rollouts[key]
        if desired.stable not in (version, replaced):
            return None
        return replaced if desired.stable == version else version

    def _load(self, model: str, version: int) -> tuple[str, NDArray[Any]]:
        """A released version's digest and parameters, its signature and files checked."""
        directory = self.artifacts_dir / model / str(version)
        # mapped, as build_book does: the base's pages are read when used, not kept; from
        # the descriptor its digest was checked from
        manifest, params = load_signed_weights(
            directory, self.trusted, model=model, version=version
        )
        return version_digest(manifest), params

    # -- rebasing (in the round loop) ------------------------------------------------------
    async def apply(self, model: str) -> bool:
        """Rebase ``model``'s book if a rebase is ready and nothing is being released
        (a closing or secure round finishes first); True when it was rebased."""
        ready, book = self.ready.get(model), self.driver.books[model]
        if ready is None:
            return False
        rnd = book.current
        if rnd is not None and (rnd.closing_ts is not None or rnd.announcement.secure):
            return False
        del self.ready[model]
        if ready.from_version != book.version:  # the book moved on meanwhile
            return False
        abandoned = book.rebase(ready.version, ready.digest, ready.params)
        self._prune(model)
        self.driver.save(model)
        if self.rollouts is not None:  # a waiting release descends from the dropped one
            self.rollouts.withdraw(model)
        log.warning(
            "rebased %s on version %d, the version the fleet serves: rollout %s dropped "
            "version %s; the next release is version %d",
            model,
            ready.version,
            ready.rollout,
            ready.dropped,
            book.newest + 1,
            extra={
                "model": model,
                "rollout": ready.rollout,
                "version": ready.version,
                "from_version": ready.from_version,
                "round": abandoned.round if abandoned else None,
            },
        )
        if abandoned is not None:
            await self._record(book, abandoned, ready)
        return True

    def _prune(self, model: str) -> None:
        """Async bases: only the book's version and its ancestors."""
        book = self.driver.books[model]
        keep = set(lineage(self.artifacts_dir / model, book.version, self.trusted))
        book.history = {v: d for v, d in book.history.items() if v in keep}

    async def _record(self, book: RoundBook, rnd: OpenRound, ready: Rebase) -> None:
        """The abandoned round: closed in ``fedgate_rounds``, ``failed`` in the round log."""
        a = rnd.announcement
        reason = (
            f"abandoned: rollout {ready.rollout} dropped version {ready.dropped}; rounds are "
            f"based on version {ready.version}, the version the fleet serves"
        )
        record = RoundRecord(
            model=book.model,
            round=a.round,
            mode=a.mode,
            outcome="failed",
            reason=reason,
            base_version=a.base_version,
            opened_ts=a.opened_ts,
            closed_ts=time.time(),
            contributors=[
                Contributor(
                    edge_id=c.edge_id,
                    samples=c.samples,
                    base_version=c.base_version,
                    weight=0.0,
                    metrics=c.metrics,
                )
                for c in sorted(rnd.contributions(), key=lambda c: c.edge_id)
            ],
            secure=a.secure,
            recipe=a.recipe,
        )
        closed = a.model_copy(update={"state": "closed"}).encode()

        async def put() -> None:
            rounds = await kv_bucket(self.js, ROUNDS_BUCKET, self.replicas)
            if book.current is None:  # the next round is not announced yet
                await rounds.put(book.model, closed)
            log_kv = await kv_bucket(self.js, ROUND_LOG_BUCKET, self.replicas)
            await log_kv.put(round_key(book.model, a.round), record.encode())

        await retry_transient(put, "abandoned round record")
