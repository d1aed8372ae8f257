"""Checkpoints of a model's rounds: kill the trainer anywhere and resume without loss.

A checkpoint is ``meta.json`` (round number, base version and digest, the open round's
announcement and contributions) plus ``arrays-<gen>.npz`` (global parameters, the round's
running sum, the strategy's server state). Arrays are written first under a new
generation, fsynced, then ``meta.json`` is replaced atomically to point at them: a crash
leaves either the old or the new checkpoint, never a mix. No pickle: ``np.savez`` of
plain arrays, loaded with ``allow_pickle=False``.

Exactly-once with the ledger: an update counts when the ledger records it; the
checkpoint lists the update ids folded into the round. On resume, ledger records of the
round that the checkpoint does not list are folded again from the stream.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from fedcore.files import write_atomic
from fedcore.pages import file_pages
from fedcore.wire import RoundAnnouncement, round_id
from trainer.aggregate import WeightedSum
from trainer.errors import TrainerError
from trainer.rounds import Contribution, OpenRound, RoundBook

META = "meta.json"

_encoded: dict[Path, dict[str, tuple[Contribution, str]]] = {}
"""By checkpoint directory: each folded contribution's JSON by update id, with the object
it was made from. A round's checkpoint is written after every update, and encoding all N
contributions each time made a round of N updates cost O(N^2) (issue #17: 1,000 edges)."""


def _folded_json(directory: Path, folded: dict[str, Contribution]) -> str:
    """The JSON list of ``folded``, encoding only contributions not encoded before (a
    contribution replaced under the same update id, as folding held updates does, is
    encoded again); entries of other rounds are dropped."""
    known = _encoded.get(directory, {})
    kept: dict[str, tuple[Contribution, str]] = {}
    for update_id, c in folded.items():
        cached = known.get(update_id)
        if cached is None or cached[0] is not c:
            cached = (c, json.dumps(asdict(c), sort_keys=True))
        kept[update_id] = cached
    _encoded[directory] = kept
    return "[" + ",".join(text for _, text in kept.values()) + "]"


@dataclass(frozen=True)
class Restored:
    """What a checkpoint holds."""

    next_round: int
    version: int
    digest: str
    params: NDArray[Any]
    announcement: RoundAnnouncement | None
    folded: dict[str, Contribution]
    round_arrays: dict[str, NDArray[Any]]
    server_state: dict[str, NDArray[Any]]
    step_scale: float = 1.0


_WRITE_SLICE = 1 << 20
_npy_header: Callable[[NDArray[Any]], dict[str, Any]] = np.lib.format.header_data_from_array_1_0
_write_npy_header: Callable[[IO[bytes], dict[str, Any]], None] = (
    np.lib.format.write_array_header_1_0
)


def _write_npz(f: BinaryIO, arrays: dict[str, NDArray[Any]]) -> None:
    """What ``np.savez`` writes (uncompressed ``.npy`` members, read by ``np.load``), a
    1 MiB slice at a time from each array's own memory: ``np.savez`` copies 16 MiB
    blocks (a whole array up to that size), at every fold of a large model."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            pages = file_pages(value)  # parameters mapped from disk: not kept resident
            array = np.ascontiguousarray(value)
            with zf.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                _write_npy_header(member, _npy_header(array))
                raw = array.reshape(-1).view(np.uint8).data
                for at in range(0, len(raw), _WRITE_SLICE):
                    member.write(raw[at : at + _WRITE_SLICE])
                    if pages is not None:
                        pages.drop((at + _WRITE_SLICE) // array.itemsize)


def save(directory: Path, book: RoundBook) -> None:
    """Write a checkpoint of ``book`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    old = _read_meta(directory)
    gen = int(old["generation"]) + 1 if old else 1
    params = book.params  # as it is when FP32 already: a mapped file stays one
    arrays: dict[str, NDArray[Any]] = {
        "params": params if params.dtype == np.float32 else params.astype(np.float32)
    }
    for key, value in book.strategy.server_state().items():
        arrays[f"server.{key}"] = value
    rnd = book.current
    if rnd is not None and isinstance(rnd.state, WeightedSum):
        for key, value in rnd.state.snapshot().items():
            arrays[f"round.{key}"] = value
    arrays_path = directory / f"arrays-{gen}.npz"
    with arrays_path.open("wb") as f:
        _write_npz(f, arrays)
        f.flush()
        os.fsync(f.fileno())
    meta = {
        "generation": gen,
        "model": book.model,
        "next_round": book.next_round,
        "version": book.version,
        "digest": book.digest,
        "announcement": rnd.announcement.model_dump() if rnd else None,
        "round_state_saved": bool(rnd and isinstance(rnd.state, WeightedSum)),
        "step_scale": book.step_scale,
    }
    folded = _folded_json(directory, rnd.folded if rnd else {})
    text = json.dumps(meta, sort_keys=True)[:-1] + ', "folded": ' + folded + "}"
    write_atomic(directory / META, text.encode(), sync_dir=True)
    for stale in directory.glob("arrays-*.npz"):
        if stale != arrays_path:
            stale.unlink(missing_ok=True)


def _read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / META
    if not path.exists():
        return None
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise TrainerError("checkpoint-corrupt", f"{path}: {exc}") from None
    return meta


def load(directory: Path) -> Restored | None:
    """The checkpoint in ``directory``, or None when there is none."""
    meta = _read_meta(directory)
    if meta is None:
        return None
    try:
        with np.load(directory / f"arrays-{meta['generation']}.npz", allow_pickle=False) as npz:
            arrays = {k: np.array(npz[k]) for k in npz.files}
        announcement = meta["announcement"]
        folded = {c["update_id"]: Contribution(**c) for c in meta["folded"]}
        saved = bool(meta["round_state_saved"])
        return Restored(
            next_round=int(meta["next_round"]),
            version=int(meta["version"]),
            digest=str(meta["digest"]),
            params=arrays["params"].astype(np.float32),
            announcement=RoundAnnouncement(**announcement) if announcement else None,
            folded=folded if saved else {},
            round_arrays={k[6:]: v for k, v in arrays.items() if k.startswith("round.")},
            server_state={k[7:]: v for k, v in arrays.items() if k.startswith("server.")},
            step_scale=float(meta.get("step_scale", 1.0)),
        )
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise TrainerError("checkpoint-corrupt", f"{directory}: {exc}") from None


def resume(book: RoundBook, restored: Restored) -> None:
    """Put a restored checkpoint into a fresh ``book`` (same model and strategy)."""
    book.next_round = restored.next_round
    book.step_scale = restored.step_scale
    book.version, book.digest, book.params = restored.version, restored.digest, restored.params
    book.history[restored.version] = restored.digest
    if restored.server_state:
        book.strategy.load_server_state(
            {k: v.astype(np.float64) for k, v in restored.server_state.items()}
        )
    if restored.announcement is None:
        book.current = None
        return
    a = restored.announcement
    state = book.strategy.start(book.params.size, round_id=round_id(book.model, a.round))
    if restored.round_arrays and isinstance(state, WeightedSum):
        state = WeightedSum.restore(restored.round_arrays, round_id=round_id(book.model, a.round))
    book.current = OpenRound(a, state, dict(restored.folded))
