"""Central differential privacy: DP-FedAvg (McMahan et al., ICLR 2018).

Each update is clipped to L2 norm ``clip_norm`` (``S``) and the clipped updates are
summed with equal weight, so adding or removing one edge changes the sum by at most
``S``. (With secure aggregation the edges clip and the trainer gets only the sum: the
noise is then calibrated to the larger of ``clip_norm`` and the edges' bound, see
:meth:`DPFedAvg.noise_std_for`.) Gaussian noise ``N(0, (z * S)^2)`` per coordinate is
added to the sum, which is divided by ``expected_updates`` when set (a fixed
denominator, as in the paper) or by the number of updates folded (that count is then
released too), and applied with ``server_lr``. Sample weights are ignored on purpose:
weighting by a self-reported example count would break the sensitivity bound.

Every release is charged at sampling rate 1: the trainer's cohort (``sample_fraction``)
is a fixed-size choice published in the round announcement, not Poisson sampling with a
hidden choice, so the accountant's amplification by sampling does not apply and
``sample_rate`` other than 1 is refused (issue #16, finding 10).

The noise comes from the operating system's CSPRNG (``os.urandom``), never from a
seedable PRNG: 64-bit words become uniforms in (0, 1) and pairs of uniforms become
normals by the Box-Muller transform, vectorised. Caveat: this is floating-point
noise, whose low-order bits can leak a little more than the ideal mechanism
(Mironov 2012; Holohan & Braghin 2021); a discrete-Gaussian sampler would close that.

With a :class:`~trainer.strategies.accountant.PrivacyLedger`, ``start`` refuses a round
the model's budget cannot pay for (``PrivacyBudgetExceeded``) and ``finalize``
records the release before the noisy aggregate exists; once the budget is spent,
training for that model stops.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from trainer.aggregate import F32Array, F64Array, WeightedSum
from trainer.errors import StrategyConfigError
from trainer.strategies.accountant import PrivacyLedger
from trainer.strategies.base import (
    OptionValue,
    RoundState,
    StatelessMixin,
    apply_step,
    check_round,
    expect_sum,
    require_positive,
)

RandomBytes = Callable[[int], bytes]

NOT_POISSON = (
    "must be 1, got {!r}: amplification by sampling needs each edge to take part "
    "independently with that probability (Poisson sampling) and the choice to stay hidden, "
    "but the trainer invites a fixed-size cohort and announces it, so epsilon is charged "
    "without amplification"
)

_TWO_POW_MINUS_52 = 2.0**-52


def uniforms_from_bytes(data: bytes, count: int) -> F64Array:
    """``count`` uniforms in the open interval (0, 1) from ``8 * count`` random bytes.

    Each little-endian 64-bit word keeps its top 52 bits ``k``; the uniform is
    ``(k + 0.5) / 2^52``, exactly representable, so 0 and 1 never occur (with 53 bits
    the largest value would round to 1.0).
    """
    if len(data) != 8 * count:
        raise ValueError(f"need {8 * count} random bytes, got {len(data)}")
    words = np.frombuffer(data, dtype="<u8")
    u = (words >> np.uint64(12)).astype(np.float64)
    u += 0.5
    u *= _TWO_POW_MINUS_52
    return u


def box_muller(u1: F64Array, u2: F64Array) -> tuple[F64Array, F64Array]:
    """Two independent standard normals per pair of uniforms in (0, 1):
    ``r = sqrt(-2 ln u1)``, ``(r cos 2 pi u2, r sin 2 pi u2)``."""
    r = np.sqrt(-2.0 * np.log(u1))
    theta = (2.0 * math.pi) * u2
    return r * np.cos(theta), r * np.sin(theta)


def gaussian_noise(n: int, std: float, random_bytes: RandomBytes = os.urandom) -> F64Array:
    """``n`` samples of ``N(0, std^2)`` from a cryptographically secure byte source."""
    if n < 0 or not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"need n >= 0 and a finite std >= 0, got {n}, {std}")
    pairs = (n + 1) // 2
    u = uniforms_from_bytes(random_bytes(16 * pairs), 2 * pairs)
    z0, z1 = box_muller(u[:pairs], u[pairs:])
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = z0
    out[1::2] = z1
    out = out[:n]
    out *= std
    return out


class DPFedAvg(StatelessMixin):
    """Clip to ``clip_norm``, sum, add ``N(0, (noise_multiplier * clip_norm)^2)``, average."""

    name: ClassVar[str] = "dp_fedavg"
    streams: ClassVar[bool] = True

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        server_lr: float = 1.0,
        expected_updates: int | None = None,
        ledger: PrivacyLedger | None = None,
        model: str = "",
        sample_rate: float = 1.0,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.clip_norm = require_positive(self.name, "clip_norm", clip_norm)
        self.noise_multiplier = require_positive(self.name, "noise_multiplier", noise_multiplier)
        self.server_lr = require_positive(self.name, "server_lr", server_lr)
        if expected_updates is not None and int(expected_updates) < 1:
            raise StrategyConfigError(self.name, "expected_updates", "must be >= 1 or unset")
        self.expected_updates = None if expected_updates is None else int(expected_updates)
        self.sample_rate = float(sample_rate)
        if self.sample_rate != 1.0:
            raise StrategyConfigError(self.name, "sample_rate", NOT_POISSON.format(sample_rate))
        if ledger is not None and not model:
            raise StrategyConfigError(self.name, "model", "a ledger needs the model's name")
        self.ledger = ledger
        self.model = model
        self._random_bytes = random_bytes

    def epsilon_spent(self) -> float | None:
        return None if self.ledger is None else float(self.ledger.spent(self.model))

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the sum."""
        return self.noise_multiplier * self.clip_norm

    def noise_std_for(self, acc: WeightedSum) -> float:
        """The noise of a round: calibrated to ``clip_norm``, or to the larger bound a
        securely aggregated sum carries (the edges' clip plus quantisation error, set by
        :meth:`WeightedSum.fold_sum`), so the noise never falls short of the sensitivity."""
        return self.noise_multiplier * max(self.clip_norm, acc.sensitivity or 0.0)

    def options(self) -> dict[str, OptionValue]:
        return {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "server_lr": self.server_lr,
            "expected_updates": self.expected_updates or 0,
            "sample_rate": self.sample_rate,
            "model": self.model,
        }

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        if self.ledger is not None:
            self.ledger.check(self.model, self.noise_multiplier, self.sample_rate)
        return WeightedSum(dim, round_id)

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        return expect_sum(state, self.name).fold(update, 1.0, max_norm=self.clip_norm)

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        acc = expect_sum(state, self.name)
        check_round(acc, global_params, self.name)
        if self.ledger is not None:
            release_id = acc.round_id or uuid.uuid4().hex
            self.ledger.charge(self.model, release_id, self.noise_multiplier, self.sample_rate)
        total = acc.weighted_sum()
        total += gaussian_noise(acc.dim, self.noise_std_for(acc), self._random_bytes)
        total /= float(self.expected_updates or acc.count)
        return apply_step(global_params, total, self.server_lr)
