"""Clipping and quantisation of updates into Z_{2**32}, and dequantisation of their sum.

An update is clipped to L2 norm ``clip_norm`` (so every coordinate lies in
``[-clip_norm, clip_norm]``), mapped affinely onto ``[0, 2**bits - 1]`` and rounded
(stochastically, unbiased, or to nearest). ``bits`` is chosen (:func:`config.max_quant_bits`)
so that the sum of every participant's values stays below 2**32: the masked sum taken
modulo 2**32 is then the exact integer sum. The randomness for stochastic rounding is an
AES-CTR stream under a fresh random key, never numpy's RNG.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import SecAggError
from fedcore.secagg.config import RoundParams
from fedcore.secagg.prg import uniform01

FloatArray = NDArray[np.floating[Any]]


def clip_l2(update: FloatArray, bound: float) -> NDArray[np.float64]:
    """``update`` as float64, scaled down to L2 norm ``bound`` if it is longer."""
    x = np.asarray(update, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise SecAggError("non-finite", "the update holds NaN or infinite values")
    norm = float(np.linalg.norm(x))
    if norm > bound:
        x = x * (bound / norm)
    return x


def step(params: RoundParams) -> float:
    """One quantisation step, in update units: ``2 * clip_norm / (2**bits - 1)``."""
    return 2.0 * params.clip_norm / (params.levels - 1)


def edge_bound(params: RoundParams, dim: int) -> float:
    """L2 bound on one edge's dequantised update: its clip plus the rounding error, below
    one step per coordinate (``step * sqrt(dim)``)."""
    return params.clip_norm + step(params) * math.sqrt(dim)


def _scale(params: RoundParams) -> float:
    return (params.levels - 1) / (2.0 * params.clip_norm)


def quantize(
    update: FloatArray, params: RoundParams, stochastic: bool | None = None
) -> NDArray[np.uint32]:
    """Clip ``update`` and quantise it to ``params.quant_bits``-bit unsigned integers."""
    use_random = params.stochastic_rounding if stochastic is None else stochastic
    x = clip_l2(update, params.clip_norm)
    np.clip(x, -params.clip_norm, params.clip_norm, out=x)
    v = (x + params.clip_norm) * _scale(params)
    if use_random:
        v += uniform01(os.urandom(32), v.size)
        np.floor(v, out=v)
    else:
        np.rint(v, out=v)
    np.clip(v, 0, params.levels - 1, out=v)
    return v.astype(np.uint32)


def dequantize_sum(
    total: NDArray[np.uint32], count: int, params: RoundParams
) -> NDArray[np.float64]:
    """The float sum of ``count`` updates whose quantised values sum to ``total``."""
    return total.astype(np.float64) / _scale(params) - count * params.clip_norm


def check_aggregate(
    total: NDArray[np.uint32], float_sum: NDArray[np.float64], count: int, params: RoundParams
) -> None:
    """Refuse (``out-of-range``) an unmasked sum that ``count`` edges following the protocol
    could not have produced: a coordinate above ``count * (2**bits - 1)`` (a masked input
    outside ``[0, 2**bits)``, wrapped modulo 2**32), or an L2 norm above ``count`` times
    :func:`edge_bound`. What one edge can still do is shift the sum within these bounds."""
    top = count * (params.levels - 1)
    over = np.flatnonzero(total > top)
    if over.size:
        i = int(over[0])
        raise SecAggError(
            "out-of-range",
            f"{over.size} coordinates of the unmasked sum exceed {top}, the most {count} "
            f"edges' {params.quant_bits}-bit values can reach (coordinate {i}: {int(total[i])})",
        )
    norm = float(np.linalg.norm(float_sum))
    limit = count * edge_bound(params, total.size) * (1 + 1e-9)
    if not norm <= limit:
        raise SecAggError(
            "out-of-range",
            f"the unmasked sum has L2 norm {norm:.6g}, above {limit:.6g}, the most {count} "
            f"edges clipped to {params.clip_norm:g} can reach",
        )
