"""Per-version label tallies from the edge's spool, for the rollout label gate.

Feedback labels are joined to captured samples, each stamped with the version that
served it (:data:`fedcore.triton_model.SPOOL_SCHEMA`). While a rollout has a candidate
the edge counts, per version, the labelled samples, those whose served answer matched the
label (models whose metric is accuracy: the argmax of the task's output) and the sum of
the model's per-sample metric; only these numbers leave the edge.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection
from pathlib import Path

import numpy as np

from fedcore.models import get_spec
from fedcore.spec import ModelSpec, TensorSpec
from fedcore.task import decode_labels, sample_scores
from fedcore.wire import LabelTally

log = logging.getLogger(__name__)


def tally_labels(spool: Path, model: str, versions: Collection[int]) -> dict[int, LabelTally]:
    """``{version: LabelTally}`` for ``versions`` with labels in ``spool`` (read-only)."""
    if not versions or not spool.exists():
        return {}
    spec = get_spec(model)
    where = _target_offset(spec)
    if where is None:
        return {}
    offset, out = where
    dtype = np.dtype(out.numpy_dtype).newbyteorder("<")
    size = out.width * dtype.itemsize
    marks = ",".join("?" for _ in versions)
    query = (
        "SELECT version, label, outputs FROM samples "  # noqa: S608 - only '?' marks are interpolated
        f"WHERE label IS NOT NULL AND version IN ({marks})"
    )
    try:
        conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = conn.execute(query, [int(v) for v in versions]).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("label tally of %s unavailable: %s", model, exc)
        return {}
    totals: dict[int, list[float]] = {}
    for version, label, blob in rows:
        if blob is None or len(blob) < offset + size:
            continue
        answer = np.frombuffer(blob[offset : offset + size], dtype=dtype).reshape(1, -1)
        try:
            target = decode_labels(spec.task, [label], out.width)
        except (ValueError, TypeError):
            continue
        score = float(sample_scores(spec.task, answer, target)[0])
        counts = totals.setdefault(int(version), [0, 0, 0.0])
        counts[0] += 1
        counts[1] += int(spec.task.metric == "accuracy" and score == 1.0)
        counts[2] += score
    return {v: LabelTally(total=int(t), correct=int(c), score=s) for v, (t, c, s) in totals.items()}


def _target_offset(spec: ModelSpec) -> tuple[int, TensorSpec] | None:
    """Where the task's output starts in a captured output row, and the output."""
    offset = 0
    for t in spec.captured_outputs:
        if t.name == spec.target.name:
            return offset, t
        offset += t.width * t.numpy_dtype.itemsize
    return None  # the task's output is not captured: nothing to tally
