"""A user's files: pretrained weights (safetensors) and an evaluation set (.npz, safetensors).

Nothing here unpickles: safetensors is a JSON header and raw little-endian buffers, and
``.npz`` files are opened with ``allow_pickle=False``. A pickle file offered as weights is
recognised by its first bytes and refused before anything reads it further.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError

if TYPE_CHECKING:
    import torch

    from fedcore.spec import ModelSpec

_PICKLE_PROTOCOL = 0x80  # protocol 2+ starts with PROTO 0x80
_ZIP = b"PK\x03\x04"  # torch.save's default container: a zip around a pickle
EVAL_LABELS = "y"
"""The key of the labels in an evaluation file; every other key is an input by name."""


def refuse_pickle(path: Path, what: str) -> None:
    """Raise unless ``path`` starts like safetensors (an 8-byte little-endian header length,
    then the JSON header's ``{``); a pickle or torch.save zip is named as such. Reads 9
    bytes, never unpickles."""
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return
    if head[:1] == bytes([_PICKLE_PROTOCOL]) and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ModelSpecError(f"{what}: {path} is a pickle file; refused (use safetensors)")
    if head[:4] == _ZIP:
        raise ModelSpecError(
            f"{what}: {path} is a zip (torch.save) file; refused (use safetensors)"
        )
    raise ModelSpecError(f"{what}: {path} is not a safetensors file; refused")


def read_safetensors(path: Path, what: str) -> dict[str, NDArray[Any]]:
    """Every tensor of a safetensors file as numpy arrays (pickle files refused)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ModelSpecError(f"{what}: {path} does not exist")
    refuse_pickle(path, what)
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelSpecError(f"{what}: {path} is not a readable safetensors file: {exc}") from None


def load_initial_weights(spec: ModelSpec, module: torch.nn.Module) -> None:
    """Load ``spec.initial_weights`` into ``module``: every name and shape must match."""
    import torch

    path = spec.initial_weights
    if path is None:
        raise ModelSpecError(f"model {spec.name!r}: initial_weights is not set")
    what = f"model {spec.name!r} initial_weights"
    tensors = read_safetensors(Path(path), what)
    state = module.state_dict()
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    if missing or extra:
        raise ModelSpecError(
            f"{what}: names do not match the module (missing {missing}, unexpected {extra})"
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, module {tuple(v.shape)}"
        for k, v in state.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ModelSpecError(f"{what}: shapes do not match the module: {'; '.join(wrong)}")
    loaded = {
        k: torch.from_numpy(np.ascontiguousarray(a)).to(state[k].dtype) for k, a in tensors.items()
    }
    module.load_state_dict(loaded)


def load_evaluation_file(spec: ModelSpec, path: Path) -> tuple[Any, NDArray[Any]]:
    """(x, y) from an ``.npz`` (no pickle) or safetensors file: key ``y`` the labels, each
    input by its tensor name (a one-input model's x is returned as an array)."""
    what = f"model {spec.name!r} evaluation_set"
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise ModelSpecError(f"{what}: {path} is not a readable .npz: {exc}") from None
    else:
        arrays = read_safetensors(path, what)
    names = [t.name for t in spec.inputs]
    missing = [k for k in (*names, EVAL_LABELS) if k not in arrays]
    if missing:
        raise ModelSpecError(f"{what}: {path} lacks arrays {missing}")
    y = arrays[EVAL_LABELS]
    if any(len(arrays[n]) != len(y) for n in names):
        raise ModelSpecError(f"{what}: inputs and labels have different lengths")
    x: Any = arrays[names[0]] if len(names) == 1 else {n: arrays[n] for n in names}
    return x, y


def evaluation_data(spec: ModelSpec) -> tuple[Any, NDArray[Any]] | None:
    """The trainer's evaluation set for ``spec``: the user's file, a built-in's test split,
    or None (the centre holds no data)."""
    if spec.evaluation_set is not None:
        return load_evaluation_file(spec, Path(spec.evaluation_set))
    if spec.dataset is not None:
        _, _, x_test, y_test = spec.dataset()
        return x_test, y_test
    return None


def dummy_batch(spec: ModelSpec, rows: int = 4, seed: int = 0) -> dict[str, NDArray[Any]]:
    """A small random batch of the spec's inputs (-1 dims as 3), for shape and export checks."""
    rng = np.random.default_rng(seed)
    out: dict[str, NDArray[Any]] = {}
    for t in spec.inputs:
        shape = (rows, *(d if d > 0 else 3 for d in t.shape))
        if t.numpy_dtype.kind == "f":
            out[t.name] = rng.random(shape).astype(t.numpy_dtype)
        elif t.numpy_dtype.kind == "b":
            out[t.name] = rng.random(shape) > 0.5
        else:
            out[t.name] = rng.integers(0, 2, size=shape).astype(t.numpy_dtype)
    return out
