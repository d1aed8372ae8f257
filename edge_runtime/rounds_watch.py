"""Which round may this edge train for, and from which base? The trainer's announcements.

The trainer writes one :class:`~fedcore.wire.RoundAnnouncement` per model to the KV
bucket ``fedgate_rounds`` (key ``<model>``). :class:`RoundsView` keeps the latest of
each, fed by :func:`watch_rounds`; :func:`decide` (pure) turns an announcement and the
versions this edge serves into a :class:`Plan` or a :class:`Refusal`:

- ``sync``: the round must invite this edge, and the edge must serve ``base_version``
  with exactly ``base_digest`` (SHA-256 of ``model.onnx`` as its signed manifest lists
  it); otherwise it refuses (``base-not-served``, ``base-digest-mismatch``) rather than
  train on a base it is not serving;
- ``async``: the edge trains from the newest version it serves that is at most
  ``max_staleness`` versions behind ``base_version``;
- in both, an open round that this edge has not yet sent an update for; a sync round
  only before its deadline (an async round's ``deadline_ts`` is the trainer's buffer
  timeout: the round takes updates until the trainer announces the next one);
- a securely aggregated round (``secure``) only on an edge with secure aggregation on for
  the model, and, on such an edge, only a securely aggregated round: its update never
  leaves it unmasked (``secure-not-configured``, ``round-not-secure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js import JetStreamContext

from fedcore.artifact import MANIFEST, SAFE_NAME, Manifest, verify_version_dir
from fedcore.errors import ArtifactError
from fedcore.triton_model import ONNX_FILE, WEIGHTS_FILE
from fedcore.wire import ROUNDS_BUCKET, RoundAnnouncement, WireError, within_staleness

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersion:
    """A version this edge serves: its number, ``model.onnx`` digest and flat weights."""

    version: int
    digest: str
    weights: Path


@dataclass(frozen=True)
class Plan:
    """Train for ``announcement.round`` from ``base``."""

    announcement: RoundAnnouncement
    base: ServedVersion

    @property
    def round(self) -> int:
        return self.announcement.round


@dataclass(frozen=True)
class Refusal:
    """Why the edge does not train now. ``loud``: worth an event (a round this edge was
    invited to but cannot serve), as opposed to the quiet ``no-round``/``already-sent``."""

    reason: str
    detail: str
    loud: bool = False


def decide(
    announcement: RoundAnnouncement | None,
    edge_id: str,
    served: Mapping[int, ServedVersion],
    sent_rounds: Collection[int],
    now: float,
    secure: bool = False,
) -> Plan | Refusal:
    """The plan for this edge under ``announcement`` (see the module doc); ``secure``:
    this edge sends updates for the model only into securely aggregated rounds."""
    if announcement is None:
        return Refusal("no-round", "no round is announced")
    if (closed := _closed(announcement, edge_id, sent_rounds, now)) is not None:
        return closed
    if announcement.secure != secure:
        return _secure_mismatch(announcement, secure)
    if announcement.mode == "sync":
        return _sync_base(announcement, served)
    return _async_base(announcement, served)


def _closed(
    a: RoundAnnouncement, edge_id: str, sent_rounds: Collection[int], now: float
) -> Refusal | None:
    """Why this edge cannot send for round ``a`` whatever it serves (None: it can)."""
    if a.state != "open":
        return Refusal("round-closed", f"round {a.round} is closed")
    if a.mode == "sync" and now >= a.deadline_ts:
        return Refusal("deadline-passed", f"round {a.round} closed at its deadline")
    if a.round in sent_rounds:
        return Refusal("already-sent", f"an update for round {a.round} was sent")
    if not a.invites(edge_id):
        return Refusal("not-invited", f"round {a.round} did not sample {edge_id}")
    return None


def _secure_mismatch(a: RoundAnnouncement, secure: bool) -> Refusal:
    if a.secure:
        return Refusal(
            "secure-not-configured",
            f"round {a.round} is securely aggregated; secure aggregation is off for "
            f"{a.model} on this edge (FEDGATE_EDGE_SECAGG)",
            loud=True,
        )
    return Refusal(
        "round-not-secure",
        f"round {a.round} is not securely aggregated; this edge sends {a.model} updates "
        "only masked into secure rounds",
        loud=True,
    )


def _sync_base(a: RoundAnnouncement, served: Mapping[int, ServedVersion]) -> Plan | Refusal:
    base = served.get(a.base_version)
    if base is None:
        return Refusal(
            "base-not-served",
            f"round {a.round} is based on version {a.base_version}; this edge serves "
            f"{sorted(served) or 'none'}",
            loud=True,
        )
    if base.digest != a.base_digest:
        return Refusal(
            "base-digest-mismatch",
            f"version {a.base_version} here has model.onnx {base.digest[:12]}, "
            f"round {a.round} names {a.base_digest[:12]}",
            loud=True,
        )
    return Plan(a, base)


def _async_base(a: RoundAnnouncement, served: Mapping[int, ServedVersion]) -> Plan | Refusal:
    fresh = [v for v in served if within_staleness(a.base_version, v, a.max_staleness)]
    if not fresh:
        return Refusal(
            "too-stale",
            f"round {a.round} accepts versions {a.base_version - a.max_staleness}.."
            f"{a.base_version}; this edge serves {sorted(served) or 'none'}",
            loud=True,
        )
    base = served[max(fresh)]
    if base.version == a.base_version and base.digest != a.base_digest:
        return Refusal(
            "base-digest-mismatch",
            f"version {a.base_version} here has model.onnx {base.digest[:12]}",
            loud=True,
        )
    return Plan(a, base)


def still_takes(plan: Plan, current: RoundAnnouncement | None, now: float) -> str | None:
    """Why the update a job trains under ``plan`` would no longer be taken, judged by the
    ``current`` announcement (None: it would be).

    A sync job needs its own round, open, before its deadline, on its base. An async job
    goes on while the current round is async and its base is at most ``max_staleness``
    versions behind the current base: the trainer folds it, weighted down, into whatever
    buffer is open when it arrives."""
    announced = plan.announcement
    if announced.mode == "async" and current is not None and current.mode == "async":
        fresh = within_staleness(current.base_version, plan.base.version, current.max_staleness)
        checks = [
            (current.state != "open", "round-closed"),
            (not fresh, "too-stale"),
        ]
    elif current is None or current.round != announced.round:
        return "round-changed"
    else:
        checks = [
            (current.state != "open", "round-closed"),
            (now >= current.deadline_ts, "deadline-passed"),
            (current.base_version != announced.base_version, "base-changed"),
        ]
    return next((reason for failed, reason in checks if failed), None)


class RoundsView:
    """The latest announcement of each model, as the watcher saw it."""

    def __init__(self) -> None:
        self._latest: dict[str, RoundAnnouncement] = {}

    def get(self, model: str) -> RoundAnnouncement | None:
        return self._latest.get(model)

    def put(self, announcement: RoundAnnouncement) -> None:
        self._latest[announcement.model] = announcement

    def drop(self, model: str) -> None:
        self._latest.pop(model, None)

    def apply(self, key: str, value: bytes | None, deleted: bool) -> None:
        """Apply one KV entry (``<model>`` -> announcement JSON, or a delete)."""
        if deleted or not value:
            self.drop(key)
            return
        try:
            announcement = RoundAnnouncement.decode(value)
        except WireError as exc:
            log.warning("ignored round announcement: %s", exc, extra={"key": key})
            return
        if announcement.model != key:
            log.warning("ignored round announcement filed under another model's key")
            return
        self.put(announcement)


async def watch_rounds(
    js: JetStreamContext, view: RoundsView, stop: asyncio.Event, retry_s: float = 1.0
) -> None:
    """Follow ``fedgate_rounds`` until ``stop``; waits for the bucket if it is not there."""
    while not stop.is_set():
        try:
            kv = await js.key_value(ROUNDS_BUCKET)
            watcher = await kv.watchall()
        except (nats.js.errors.BucketNotFoundError, nats.errors.Error, TimeoutError):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)
            continue
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=retry_s)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None:
                    continue  # the end of the initial values
                deleted = entry.operation in ("DEL", "PURGE")
                view.apply(entry.key, entry.value, deleted)
        except nats.errors.Error as exc:
            log.warning("rounds watch interrupted: %r; watching again", exc)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


def served_versions(
    model_dir: Path,
    ready: Collection[int],
    stage: Callable[[Path, int], tuple[Manifest, Path]],
) -> dict[int, ServedVersion]:
    """The ``ready`` versions under ``model_dir`` that carry signed flat weights.

    ``stage(directory, version)`` copies the version's signed files out of the live
    repository, verifies the copy against the trainer's key and returns its manifest and
    the verified directory (:func:`stage_verified`); the learner trains from that copy.
    A version that fails is left out (and logged), never trained from.
    """
    out: dict[int, ServedVersion] = {}
    for version in sorted(ready):
        try:
            manifest, verified = stage(model_dir / str(version), version)
        except (ArtifactError, OSError) as exc:
            log.warning("served version %d not usable for training: %s", version, exc)
            continue
        if ONNX_FILE in manifest.files and WEIGHTS_FILE in manifest.files:
            out[version] = ServedVersion(
                version, manifest.files[ONNX_FILE], verified / WEIGHTS_FILE
            )
    return out


def stage_verified(
    source: Path, dest: Path, trusted: ed25519.Ed25519PublicKey, *, model: str, version: int
) -> Manifest:
    """Copy the files ``source``'s manifest lists into ``dest`` and verify the copy.

    The live version directory cannot be verified in place: Triton's python-backend stub
    writes ``__pycache__`` into it. What is verified is what the learner then reads.
    """
    try:
        listed = json.loads((source / MANIFEST).read_text())["manifest"]["files"]
        names = [str(n) for n in dict(listed)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError("malformed", f"{source / MANIFEST}: {exc}") from None
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in (*names, MANIFEST):
        if not SAFE_NAME.match(name) or (source / name).is_symlink():
            raise ArtifactError("unsafe-path", f"{name!r} cannot be staged")
        shutil.copyfile(source / name, dest / name)
    return verify_version_dir(dest, trusted, model=model, version=version)
