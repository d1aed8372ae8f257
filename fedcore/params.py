"""Model parameters as one flat FP32 vector, in the module's ``state_dict`` order.

Updates travel and aggregate as flat vectors; the layout (names and shapes) is derived
from the model spec, so both ends agree without sending it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.artifact import Manifest, verify_version_dir
from fedcore.errors import ArtifactError, ModelSpecError
from fedcore.pages import file_pages
from fedcore.triton_model import WEIGHTS_FILE

if TYPE_CHECKING:
    import torch


def layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every floating-point tensor in ``state_dict`` order."""
    return [
        (name, tuple(t.shape)) for name, t in module.state_dict().items() if t.is_floating_point()
    ]


def flatten(module: torch.nn.Module) -> NDArray[Any]:
    """All floating-point parameters and buffers as one contiguous FP32 vector (a copy)."""
    parts = [
        t.detach().to("cpu").reshape(-1).float().numpy()
        for t in module.state_dict().values()
        if t.is_floating_point()
    ]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    out: NDArray[Any] = np.concatenate(parts).astype(np.float32, copy=False)
    return out


_COPY_SLICE = 1 << 20


def load_flat(module: torch.nn.Module, vector: NDArray[Any]) -> None:
    """Write a flat FP32 vector back into ``module`` (shape-checked), tensor by tensor in
    place: no second copy of the model is built on the way. A read-only vector (mapped
    from its file) is copied a slice at a time, the slice's pages given back."""
    import torch

    state = module.state_dict()
    total = sum(t.numel() for t in state.values() if t.is_floating_point())
    if vector.ndim != 1 or vector.size != total:
        raise ModelSpecError(f"parameter vector has {vector.size} values, model needs {total}")
    pages, offset = file_pages(vector), 0
    with torch.no_grad():
        for t in state.values():
            if not t.is_floating_point():
                continue
            n = t.numel()
            chunk = np.ascontiguousarray(vector[offset : offset + n], dtype=np.float32)
            if chunk.flags.writeable:
                t.copy_(torch.from_numpy(chunk).reshape(t.shape))
            elif not t.is_contiguous():
                t.copy_(torch.from_numpy(chunk.copy()).reshape(t.shape))
            else:  # torch wraps writable arrays only: a slice at a time, not the tensor
                flat = t.view(-1)
                for at in range(0, n, _COPY_SLICE):
                    part = np.array(chunk[at : at + _COPY_SLICE])
                    flat[at : at + part.size].copy_(torch.from_numpy(part))
                    if pages is not None:
                        pages.drop(offset + at + part.size)
            offset += n


def module_over(build: Callable[[], torch.nn.Module], vector: NDArray[Any]) -> torch.nn.Module:
    """A module from ``build`` whose floating-point tensors are views of ``vector`` (flat
    FP32, :func:`layout` order), for scoring (under ``torch.no_grad``), never training.

    Built on the meta device, so neither random initial weights nor a copy of the vector
    are allocated: a writable vector is shared, a read-only one (mapped from its file) is
    wrapped as it is and its pages are read when the forward pass touches them. A module
    with tensors of another dtype, or any not in its ``state_dict``, is built and filled
    by :func:`load_flat` instead."""
    import torch

    with torch.device("meta"):
        module = build()
    state = module.state_dict()
    flat_only = all(t.dtype == torch.float32 for t in state.values())
    total = sum(t.numel() for t in state.values() if t.is_floating_point())
    if vector.ndim != 1 or vector.size != total:
        raise ModelSpecError(f"parameter vector has {vector.size} values, model needs {total}")
    if flat_only:
        whole = np.asarray(vector)
        if whole.dtype != np.float32 or not whole.flags.c_contiguous:
            whole = np.ascontiguousarray(whole, dtype=np.float32)
        with warnings.catch_warnings():  # read-only: nothing writes during scoring
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            values = torch.from_numpy(whole)
        views, offset = {}, 0
        for name, t in state.items():
            views[name] = values[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
        module.load_state_dict(views, assign=True)
    tensors = [*module.parameters(), *module.buffers()]
    if not flat_only or any(t.is_meta for t in tensors):
        module = build()
        load_flat(module, vector)
    return module


def load_weights_file(
    path: Path, expected: int | None = None, *, mapped: bool = False
) -> NDArray[Any]:
    """Read a flat FP32 ``weights.npy`` without pickle; check its size when given.

    ``mapped``: map the file read-only instead of reading it (its pages are read when
    used, and a reader may give them back: the file must not change while mapped; a
    signed version's file is mapped by :func:`load_signed_weights` instead)."""
    vector = np.load(path, allow_pickle=False, mmap_mode="r" if mapped else None)
    if vector.dtype != np.dtype("<f4") or vector.ndim != 1:
        raise ModelSpecError(f"{path}: expected a flat little-endian FP32 vector")
    if expected is not None and vector.size != expected:
        raise ModelSpecError(f"{path}: {vector.size} values, the model has {expected}")
    out: NDArray[Any] = vector
    return out


def load_signed_weights(
    directory: Path,
    trusted: ed25519.Ed25519PublicKey,
    *,
    model: str,
    version: int,
    check_onnx: bool = True,
) -> tuple[Manifest, NDArray[Any]]:
    """A signed version's manifest and its ``weights.npy``, mapped read-only: the version
    verified (:func:`fedcore.artifact.verify_version_dir`), the weights hashed from the
    descriptor that is then mapped (:func:`map_verified_weights`), so what the caller
    reads is what was verified, whatever is later renamed over the path."""
    manifest = verify_version_dir(
        directory,
        trusted,
        model=model,
        version=version,
        check_onnx=check_onnx,
        unhashed=frozenset({WEIGHTS_FILE}),
    )
    if WEIGHTS_FILE not in manifest.files:
        raise ArtifactError("missing-file", f"{directory}: the manifest lists no {WEIGHTS_FILE}")
    return manifest, map_verified_weights(directory / WEIGHTS_FILE, manifest.files[WEIGHTS_FILE])


def map_verified_weights(path: Path, digest: str) -> NDArray[Any]:
    """Open ``path`` once, check its SHA-256 is ``digest`` from that descriptor and map
    the same descriptor read-only (its pages read when used, as ``mapped`` in
    :func:`load_weights_file`). Refused if the file changes size or time while it is
    hashed. Released versions are read-only files never written in place
    (:func:`fedcore.artifact.seal_version_dir`), so the mapped inode keeps its bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(f.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise ArtifactError("unsafe-path", f"{path} is not a regular file")
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
        if h.hexdigest() != digest:
            raise ArtifactError("digest-mismatch", f"{path.name}: SHA-256 differs from manifest")
        offset, size = _flat_f32_header(f, path)
        if offset + size * 4 != before.st_size:
            raise ModelSpecError(f"{path}: {before.st_size} bytes, its header says otherwise")
        vector: NDArray[Any] = (
            np.memmap(f, dtype="<f4", mode="r", offset=offset, shape=(size,))
            if size
            else np.zeros(0, dtype="<f4")
        )
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise ArtifactError("digest-mismatch", f"{path} changed while it was verified")
    return vector


def _flat_f32_header(f: BinaryIO, path: Path) -> tuple[int, int]:
    """The data offset and length of a flat little-endian FP32 ``.npy`` read from ``f``."""
    f.seek(0)
    try:
        major, _ = np.lib.format.read_magic(f)  # type: ignore[no-untyped-call]
        if major not in (1, 2):
            raise ValueError(f"npy format version {major}")
        header: tuple[tuple[int, ...], bool, np.dtype[Any]] = (
            np.lib.format.read_array_header_1_0(f)  # type: ignore[no-untyped-call]
            if major == 1
            else np.lib.format.read_array_header_2_0(f)  # type: ignore[no-untyped-call]
        )
        shape, _, dtype = header
    except ValueError as exc:
        raise ModelSpecError(f"{path}: not a .npy file: {exc}") from None
    if dtype != np.dtype("<f4") or len(shape) != 1:
        raise ModelSpecError(f"{path}: expected a flat little-endian FP32 vector")
    return f.tell(), int(shape[0])
