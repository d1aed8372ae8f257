"""Vectors mapped read-only from a file, read a slice at a time with the pages given back.

The trainer keeps large vectors it only reads on disk: a held update of the bounds'
warm-up (``trainer.rounds.spill``) and the current parameters (``weights.npy``, mapped by
:func:`fedcore.params.load_signed_weights`). Reading one maps its pages into the process;
a pass that gives each slice's pages back as it goes (``madvise(MADV_DONTNEED)``: the
kernel reads them again from the file if they are touched again) leaves it on disk, so
the pass does not add the vector's size to the resident set.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FilePages", "file_pages"]


class FilePages:
    """The file mapping under a vector read from disk (:func:`file_pages`), for one pass
    over it: the pages are dropped from the process as the pass reads past them (the
    kernel reads them again from the file if they are touched again), so a pass over a
    held update or the current parameters does not map the whole file into the trainer's
    resident set."""

    def __init__(self, mapping: mmap.mmap, start: int, itemsize: int) -> None:
        self._mapping = mapping
        self._start = start
        self._itemsize = itemsize
        self._done = start // mmap.PAGESIZE * mmap.PAGESIZE

    def drop(self, values: int) -> None:
        """The first ``values`` values are read: give back their whole pages."""
        end = (self._start + values * self._itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._done:
            self._mapping.madvise(mmap.MADV_DONTNEED, self._done, end - self._done)
            self._done = end


def file_pages(vector: npt.NDArray[Any]) -> FilePages | None:
    """The mapping of a vector that is a file mapped read-only (a :class:`numpy.memmap`
    of mode ``r`` over ``mmap``: a spilled update, or ``np.load(..., mmap_mode="r")``),
    else ``None``. Only such a mapping may drop its pages: nothing in it is lost."""
    base = vector.base
    if not (
        isinstance(vector, np.memmap)
        and vector.mode == "r"
        and isinstance(base, mmap.mmap)
        and vector.flags.c_contiguous
    ):
        return None
    start = vector.ctypes.data - np.frombuffer(base, dtype=np.uint8).ctypes.data
    return FilePages(base, start, vector.itemsize)
