"""Compression of model updates (flat FP32 deltas) to bytes and back, at fixed dtypes.

Modes (the envelope header names the mode of its payload):

- ``none``: little-endian float32, 4 bytes a value.
- ``fp16``: little-endian float16, 2 bytes a value; values beyond the fp16 range refuse.
- ``int8``: per tensor a float32 scale (max |x| / 127), then one int8 a value.
- ``topk``: the ``ceil(fraction * n)`` largest-magnitude values: uint32 indices (strictly
  increasing) then their float32 values; the rest decode as zero.

Lossy modes take an optional :class:`ErrorFeedback`: the sender adds the residual of the
previous round before encoding and keeps what this round did not send. Decoding never
trusts the input: lengths, indices and scales are checked and non-finite values refused.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from fedcore.errors import CodecError, ResidualFileError
from fedcore.files import write_atomic

Mode = Literal["none", "fp16", "int8", "topk"]
MODES: tuple[Mode, ...] = ("none", "fp16", "int8", "topk")
Vector = npt.NDArray[np.float32]

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("i1")
_U32 = np.dtype("<u4")
_INT8_MAX = 127


class CompressionSettings(BaseModel):
    """How an edge compresses its updates (nest it in a service's settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field(default="none", description="none, fp16, int8 or topk")
    topk_fraction: float = Field(
        default=0.01, gt=0.0, le=1.0, description="share of values topk sends"
    )
    error_feedback: bool = Field(
        default=True, description="carry what lossy modes dropped into the next round"
    )


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded delta: its mode, bytes, and how many float32 values it stands for."""

    mode: Mode
    data: bytes
    values: int

    @property
    def encoded_bytes(self) -> int:
        """Bytes of the encoded payload (before the envelope)."""
        return len(self.data)

    @property
    def raw_bytes(self) -> int:
        """Bytes the same delta takes as float32."""
        return 4 * self.values


class ErrorFeedback:
    """The residual a sender keeps between rounds: what compression has not sent yet.

    :meth:`save` writes it as a ``.npy`` file (little-endian float32, written atomically
    with mode 0600, no pickle) and :meth:`load` reads it back, so a restarted sender goes
    on where it stopped."""

    def __init__(self, size: int) -> None:
        self.residual: Vector = np.zeros(size, dtype=np.float32)

    def reset(self) -> None:
        """Forget the residual (e.g. after the base model changed under the edge)."""
        self.residual[:] = 0.0

    def copy(self) -> ErrorFeedback:
        """An independent copy (encode into it; keep it only once the update was sent)."""
        out = ErrorFeedback(0)
        out.residual = self.residual.copy()
        return out

    def save(self, path: Path) -> None:
        """Write the residual to ``path`` atomically (``.npy``, float32, mode 0600)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self.residual, dtype=_F32), allow_pickle=False)
        write_atomic(path, buf.getvalue(), 0o600)

    @classmethod
    def load(cls, path: Path, size: int) -> ErrorFeedback:
        """The residual saved at ``path``; zeros when there is no file. Raises
        :class:`ResidualFileError` for a file that is not ``size`` finite float32 values."""
        out = cls(size)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return out
        try:
            saved = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ResidualFileError(f"{path} is not a .npy array: {exc}") from None
        if saved.dtype != _F32 or saved.shape != (size,):
            raise ResidualFileError(
                f"{path} holds {saved.dtype} {saved.shape}, expected float32 ({size},)",
            )
        if not np.isfinite(saved).all():
            raise ResidualFileError(f"{path} holds NaN or infinite values")
        out.residual = saved.astype(np.float32)
        return out


def sizes_from_layout(layout: Sequence[tuple[str, tuple[int, ...]]]) -> list[int]:
    """Element counts of a (name, shape) layout, as :func:`fedcore.params.layout` gives."""
    return [math.prod(shape) for _, shape in layout]


def encode_update(
    delta: npt.ArrayLike,
    sizes: Sequence[int],
    settings: CompressionSettings,
    feedback: ErrorFeedback | None = None,
) -> EncodedUpdate:
    """Encode a flat float32 delta whose tensors have ``sizes`` elements each.

    Raises ``CodecError(non-finite)`` if the delta (plus residual) holds NaN or inf, or
    does not fit the mode; ``ValueError`` if ``delta`` and ``sizes`` disagree.
    """
    x = np.asarray(delta, dtype=np.float32)
    _check_shape(x, sizes)
    if feedback is not None and settings.error_feedback:
        if feedback.residual.shape != x.shape:
            raise ValueError(f"error feedback holds {feedback.residual.size} values, not {x.size}")
        x = x + feedback.residual
    if not np.isfinite(x).all():
        raise CodecError("non-finite", "update holds NaN or infinite values")
    data = _ENCODERS[settings.mode](x, sizes, settings)
    if feedback is not None and settings.error_feedback:
        feedback.residual = x - decode_update(data, settings.mode, sizes)
    return EncodedUpdate(mode=settings.mode, data=data, values=x.size)


def decode_update(
    data: bytes | bytearray | memoryview, mode: str, sizes: Sequence[int], *, take: bool = False
) -> Vector:
    """Decode bytes of ``mode`` into a fresh float32 vector of ``sum(sizes)`` values.

    ``take``: the caller hands ``data`` over (a writable buffer it will not touch again),
    so an uncompressed payload becomes the vector without a copy (a large model's update
    is then in memory once, not twice).

    Raises ``CodecError`` with reason ``decode-error`` (unknown mode, wrong length, bad
    index or scale) or ``non-finite``.
    """
    if mode not in _DECODERS:
        raise CodecError("decode-error", f"unknown compression mode {mode!r}")
    raw = memoryview(data).cast("B")
    n = _total(sizes)
    if take and mode == "none" and not raw.readonly:
        _expect_len(raw, 4 * n, mode)
        out = np.frombuffer(raw, dtype=_F32)
    else:
        out = _DECODERS[mode](raw, n, sizes)
    if not _all_finite(out):
        raise CodecError("non-finite", f"{mode} payload decodes to NaN or infinite values")
    return out


_FINITE_SLICE = 1 << 18


def _all_finite(x: Vector) -> bool:
    """``np.isfinite(x).all()`` a slice at a time: no mask of the vector's length (a
    quarter of a large FP32 update) is allocated."""
    return all(
        bool(np.isfinite(x[at : at + _FINITE_SLICE]).all())
        for at in range(0, x.size, _FINITE_SLICE)
    )


def _total(sizes: Sequence[int]) -> int:
    if any(s < 0 for s in sizes):
        raise ValueError("tensor sizes must be non-negative")
    return sum(sizes)


def _check_shape(x: Vector, sizes: Sequence[int]) -> None:
    if x.ndim != 1:
        raise ValueError(f"delta must be a flat vector, got shape {x.shape}")
    if x.size != _total(sizes):
        raise ValueError(f"delta has {x.size} values, layout has {_total(sizes)}")
    if x.size >= 2**32:
        raise ValueError("delta has 2^32 values or more")


def _expect_len(raw: memoryview, expected: int, mode: str) -> None:
    if len(raw) != expected:
        raise CodecError("decode-error", f"{mode} payload is {len(raw)} bytes, expected {expected}")


def _enc_none(x: Vector, sizes: Sequence[int], settings: CompressionSettings) -> bytes:
    return x.astype(_F32, copy=False).tobytes()


def _dec_none(raw: memoryview, n: int, sizes: Sequence[int]) -> Vector:
    _expect_len(raw, 4 * n, "none")
    return np.frombuffer(raw, dtype=_F32).astype(np.float32)


def _enc_fp16(x: Vector, sizes: Sequence[int], settings: CompressionSettings) -> bytes:
    with np.errstate(over="ignore"):
        half = x.astype(_F16)
    if not np.isfinite(half).all():
        raise CodecError("non-finite", "update has values beyond the float16 range (65504)")
    return half.tobytes()


def _dec_fp16(raw: memoryview, n: int, sizes: Sequence[int]) -> Vector:
    _expect_len(raw, 2 * n, "fp16")
    return np.frombuffer(raw, dtype=_F16).astype(np.float32)


def _enc_int8(x: Vector, sizes: Sequence[int], settings: CompressionSettings) -> bytes:
    scales = np.zeros(len(sizes), dtype=_F32)
    q = np.zeros(x.size, dtype=_I8)
    start = 0
    for t, size in enumerate(sizes):
        part = x[start : start + size]
        peak = float(np.abs(part).max()) if size else 0.0
        scale = np.float32(peak / _INT8_MAX)
        if scale > 0.0:
            scales[t] = scale
            q[start : start + size] = np.clip(np.rint(part / scale), -_INT8_MAX, _INT8_MAX)
        start += size
    return scales.tobytes() + q.tobytes()


def _dec_int8(raw: memoryview, n: int, sizes: Sequence[int]) -> Vector:
    head = 4 * len(sizes)
    _expect_len(raw, head + n, "int8")
    scales = np.frombuffer(raw[:head], dtype=_F32)
    if not np.isfinite(scales).all():
        raise CodecError("non-finite", "int8 payload has a non-finite scale")
    if (scales < 0).any():
        raise CodecError("decode-error", "int8 payload has a negative scale")
    q = np.frombuffer(raw[head:], dtype=_I8)
    if (q == -128).any():
        raise CodecError("decode-error", "int8 payload holds -128, outside [-127, 127]")
    per_value = np.repeat(scales.astype(np.float32), np.asarray(sizes, dtype=np.int64))
    with np.errstate(over="ignore"):
        return q.astype(np.float32) * per_value


def _enc_topk(x: Vector, sizes: Sequence[int], settings: CompressionSettings) -> bytes:
    n = x.size
    if n == 0:
        return b""
    k = min(n, max(1, math.ceil(settings.topk_fraction * n)))
    picked = np.sort(np.argpartition(np.abs(x), n - k)[n - k :])
    values: Vector = x[picked]
    return picked.astype(_U32).tobytes() + values.astype(_F32).tobytes()


def _dec_topk(raw: memoryview, n: int, sizes: Sequence[int]) -> Vector:
    if len(raw) % 8:
        raise CodecError("decode-error", f"topk payload is {len(raw)} bytes, not a multiple of 8")
    k = len(raw) // 8
    if k > n:
        raise CodecError("decode-error", f"topk payload has {k} entries for {n} values")
    idx = np.frombuffer(raw[: 4 * k], dtype=_U32)
    values = np.frombuffer(raw[4 * k :], dtype=_F32)
    if k and (idx[-1] >= n or (np.diff(idx.astype(np.int64)) <= 0).any()):
        raise CodecError("decode-error", "topk indices are not strictly increasing below n")
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values
    return out


_ENCODERS = {"none": _enc_none, "fp16": _enc_fp16, "int8": _enc_int8, "topk": _enc_topk}
_DECODERS = {"none": _dec_none, "fp16": _dec_fp16, "int8": _dec_int8, "topk": _dec_topk}
