"""The edge's local spool of captured traffic: SQLite (WAL) in the edge's data directory.

Rows are written by the capture code inside Triton's python-backend stub
(``fedcore.triton_model.CAPTURE_SOURCE``: request id, input and output bytes, the model
version that served it) and evicted oldest-first beyond the spool's capacity, each
evicted id leaving a tombstone. This module is the edge runtime's side of the same
file: joining feedback labels, expiring old samples, reading the labelled training set,
and the small ``meta`` table where the edge keeps its counters (label sequence, what it
has trained on, its daily training budget, the rounds it has sent updates for).

Nothing here leaves the edge: the spool is read only by the edge runtime and its
fine-tuning worker.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcore.spec import Feeds, ModelSpec
from fedcore.task import Label, decode_labels, encode_label
from fedcore.triton_model import SPOOL_SCHEMA

_LABEL_COUNTER = "label_seq"
_TRAINED_UPTO = "trained_label_seq"


class JoinResult(Enum):
    """What became of a feedback label: joined to a sample, too late, or not ours."""

    JOINED = "joined"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SpoolStats:
    """Counts of the spool's rows."""

    samples: int
    labelled: int
    tombstones: int
    new_labels: int


@dataclass(frozen=True)
class LabelledSet:
    """Labelled samples of one model (inputs by name), split into training and held-out rows.

    The split is by request id (:func:`is_holdout`), so a sample never moves between the
    two from one round to the next. ``upto`` is the highest label sequence included.
    """

    x_train: Feeds
    y_train: NDArray[Any]
    w_train: NDArray[Any]
    x_holdout: Feeds
    y_holdout: NDArray[Any]
    upto: int


def is_holdout(request_id: str, fraction: float) -> bool:
    """Whether a sample belongs to the local held-out split (stable hash of its id)."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def spool_path(data_dir: Path, model: str) -> Path:
    """Where the spool of ``model`` lives under an edge's data directory."""
    return data_dir / "spool" / f"{model}.sqlite"


class Spool:
    """One model's spool. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, timeout_s: float = 5.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, timeout=timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SPOOL_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row is not None else default

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
            )

    def _meta_int(self, key: str) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row is not None else 0

    # -- feedback ------------------------------------------------------------------------
    def join_label(self, request_id: str, label: Label, weight: float = 1.0) -> JoinResult:
        """Attach ``label`` to the captured sample ``request_id`` (a later label replaces
        an earlier one). ``EXPIRED`` if the sample was evicted, ``UNKNOWN`` if never seen.
        A class index is stored as an integer, any other label as JSON text."""
        stored = encode_label(label)
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta_int(_LABEL_COUNTER) + 1
                cur = conn.execute(
                    "UPDATE samples SET label = ?, weight = ?, label_seq = ? WHERE request_id = ?",
                    (stored, weight, seq, request_id),
                )
                if cur.rowcount:
                    conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (_LABEL_COUNTER, str(seq)),
                    )
                    result = JoinResult.JOINED
                else:
                    gone = conn.execute(
                        "SELECT 1 FROM tombstones WHERE request_id = ?", (request_id,)
                    ).fetchone()
                    result = JoinResult.EXPIRED if gone else JoinResult.UNKNOWN
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return result

    # -- retention -----------------------------------------------------------------------
    def expire(self, max_age_s: float, now: float | None = None) -> int:
        """Evict samples captured more than ``max_age_s`` ago (tombstoned); their count."""
        cutoff = (now if now is not None else time.time()) - max_age_s
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO tombstones (request_id, evicted_ts) "
                    "SELECT request_id, ? FROM samples WHERE captured_ts < ?",
                    (time.time(), cutoff),
                )
                cur = conn.execute("DELETE FROM samples WHERE captured_ts < ?", (cutoff,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return int(cur.rowcount)

    # -- training ------------------------------------------------------------------------
    def stats(self) -> SpoolStats:
        with self._lock:
            c = self._conn
            samples = int(c.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
            labelled = int(
                c.execute("SELECT COUNT(*) FROM samples WHERE label IS NOT NULL").fetchone()[0]
            )
            tombstones = int(c.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])
            new = int(
                c.execute(
                    "SELECT COUNT(*) FROM samples WHERE label_seq > ?",
                    (self._meta_int(_TRAINED_UPTO),),
                ).fetchone()[0]
            )
        return SpoolStats(samples, labelled, tombstones, new)

    def new_labels(self) -> int:
        """Labelled samples joined since the last :meth:`mark_trained`."""
        return self.stats().new_labels

    def mark_trained(self, upto: int) -> None:
        """Labels up to sequence ``upto`` have gone into a published update."""
        with self._lock:
            current = self._meta_int(_TRAINED_UPTO)
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_TRAINED_UPTO, str(max(current, upto))),
            )

    def labelled(self, spec: ModelSpec, holdout_fraction: float) -> LabelledSet:
        """Every labelled sample of ``spec``, decoded by its captured inputs and task, split.

        A row is the captured inputs' bytes back to back, in declared order
        (``fedcore.triton_model``); a row too short for this layout is skipped.
        """
        if not spec.trainable:
            raise ValueError(f"model {spec.name!r}: not every input is captured; cannot train")
        tensors = spec.captured_inputs
        row_bytes = sum(t.width * t.numpy_dtype.itemsize for t in tensors)
        with self._lock:
            rows = self._conn.execute(
                "SELECT request_id, inputs, label, weight, label_seq FROM samples "
                "WHERE label IS NOT NULL ORDER BY seq"
            ).fetchall()
        train: list[tuple[bytes, Any, float]] = []
        held: list[tuple[bytes, Any, float]] = []
        upto = 0
        for request_id, blob, label, weight, seq in rows:
            if len(blob) < row_bytes:
                continue  # written by another model layout; not usable here
            upto = max(upto, int(seq))
            target = held if is_holdout(str(request_id), holdout_fraction) else train
            target.append((bytes(blob[:row_bytes]), label, float(weight)))
        x_tr, y_tr, w_tr = _decode(spec, train)
        x_ho, y_ho, _ = _decode(spec, held)
        return LabelledSet(x_tr, y_tr, w_tr, x_ho, y_ho, upto)


def _decode(
    spec: ModelSpec, rows: list[tuple[bytes, Any, float]]
) -> tuple[Feeds, NDArray[Any], NDArray[Any]]:
    """Rows of captured input bytes, labels and weights as arrays."""
    row_bytes = sum(t.width * t.numpy_dtype.itemsize for t in spec.captured_inputs)
    joined = b"".join(r[0] for r in rows)
    blob = np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), row_bytes)
    feeds: Feeds = {}
    offset = 0
    for t in spec.captured_inputs:
        size = t.width * t.numpy_dtype.itemsize
        part = np.ascontiguousarray(blob[:, offset : offset + size])
        feeds[t.name] = part.view(t.numpy_dtype).reshape(len(rows), *t.shape).copy()
        offset += size
    y = decode_labels(spec.task, [r[1] for r in rows], spec.target.width)
    w = np.asarray([r[2] for r in rows], dtype=np.float32)
    return feeds, y, w
