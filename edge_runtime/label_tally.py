"""Per-version label accuracy from the edge's spool, for the rollout accuracy gate.

Feedback labels are joined to captured samples, each stamped with the version that
served it (:data:`fedcore.triton_model.SPOOL_SCHEMA`). While a rollout has a candidate
the edge counts, per version, the labelled samples and those whose served answer (the
argmax of the first output) matched the label; only these two numbers leave the edge.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection
from pathlib import Path

import numpy as np

from fedcore.models import get_spec
from fedcore.wire import LabelTally

log = logging.getLogger(__name__)


def tally_labels(spool: Path, model: str, versions: Collection[int]) -> dict[int, LabelTally]:
    """``{version: LabelTally}`` for ``versions`` with labels in ``spool`` (read-only)."""
    if not versions or not spool.exists():
        return {}
    out = get_spec(model).outputs[0]
    dtype = np.dtype(out.numpy_dtype).newbyteorder("<")
    width = int(np.prod(out.shape))
    size = width * dtype.itemsize
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
    totals: dict[int, list[int]] = {}
    for version, label, blob in rows:
        if blob is None or len(blob) < size:
            continue
        answer = int(np.frombuffer(blob[:size], dtype=dtype).argmax())
        counts = totals.setdefault(int(version), [0, 0])
        counts[0] += 1
        counts[1] += int(answer == int(label))
    return {v: LabelTally(total=t, correct=c) for v, (t, c) in totals.items()}
