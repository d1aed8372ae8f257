"""Secure-aggregation settings per model, the per-round parameters derived from them, and
the check that refuses aggregation strategies secure aggregation cannot run.

Secure aggregation hands the trainer the *sum* of the surviving edges' updates and nothing
else, so every rule that needs individual updates (median, trimmed mean, Krum, Bulyan,
trainer-side clipping of each update) is impossible with it: :func:`check_compatible`
refuses those combinations at start with a message that says why. Central DP noise is
added to the sum and still applies; the clipping it needs happens on the edges
(:attr:`SecAggConfig.clip_norm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcore.errors import ConfigError

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS
MIN_PARTICIPANTS = 3
ROUND_FAILURE_TARGET = 1e-3

# Strategies that only need the (unweighted) sum of updates: the server-side optimisers
# of FedAdam, FedYogi, FedAdagrad and FedAvgM act on the aggregate, FedProx changes only
# the local objective.
SUM_STRATEGIES = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"})
# Strategies that need each update on its own, with the reason shown to the operator.
ROBUST_STRATEGIES = {
    "median": "the coordinate-wise median needs every individual update",
    "trimmed_mean": "the trimmed mean sorts individual updates per coordinate",
    "krum": "Krum scores each individual update by its distances to the others",
    "multi_krum": "Multi-Krum scores each individual update by its distances to the others",
    "bulyan": "Bulyan selects and trims individual updates",
}


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings of one model (the edges and the trainer must agree).

    ``threshold``: fraction of a neighbourhood whose shares reconstruct a secret; the
    Shamir threshold is ``floor(threshold * k) + 1`` (a strict majority at 0.5), and the
    same rule over all participants is the fewest survivors a round accepts.
    ``clip_norm``: L2 bound each edge clips its update to before quantising (this is also
    the sensitivity central DP noise must be calibrated to).
    ``neighbours``: even neighbour count ``k``; ``None`` picks ``2 * ceil(log2 n)``, or,
    with ``expected_dropout`` set, the smallest even ``k >= 2 * ceil(log2 n)`` that keeps the
    chance of a failed round under :data:`ROUND_FAILURE_TARGET` (see :func:`neighbours_for`).
    ``expected_dropout``: fraction of edges expected to drop out of a round; ``None`` sizes
    the graph for rare dropouts only. Every neighbourhood must keep a majority.
    ``quant_bits``: quantisation levels ``2**quant_bits``; ``None`` picks the most that
    cannot overflow 2**32 when every participant's value is summed.
    ``stochastic_rounding``: unbiased randomised rounding (else round to nearest).
    """

    threshold: float = 0.5
    clip_norm: float = 1.0
    neighbours: int | None = None
    quant_bits: int | None = None
    stochastic_rounding: bool = True
    expected_dropout: float | None = None

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold < 1.0:
            raise ConfigError(
                f"secagg threshold must be in [0.5, 1) (a majority of each neighbourhood), "
                f"got {self.threshold}"
            )
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"secagg clip_norm must be a positive number, got {self.clip_norm}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ConfigError(
                f"secagg neighbours must be an even number >= 2, got {self.neighbours}"
            )
        if self.expected_dropout is not None:
            if not 0.0 <= self.expected_dropout < 0.5:
                raise ConfigError(
                    f"secagg expected_dropout must be in [0, 0.5), got {self.expected_dropout}"
                )
            if self.neighbours is not None:
                raise ConfigError("set secagg neighbours or expected_dropout, not both")
        if self.quant_bits is not None and not 1 <= self.quant_bits <= MODULUS_BITS - 1:
            raise ConfigError(f"secagg quant_bits must be in [1, 31], got {self.quant_bits}")


@dataclass(frozen=True)
class RoundParams:
    """Everything a round computes with, derived from a config and the cohort size."""

    participants: int
    neighbours: int
    clip_norm: float
    quant_bits: int
    stochastic_rounding: bool
    threshold: float

    @property
    def levels(self) -> int:
        """Number of quantisation levels, ``2**quant_bits``."""
        return 1 << self.quant_bits

    def shamir_threshold(self, group: int) -> int:
        """Shares needed out of a group of ``group`` holders: a strict ``threshold`` share."""
        return shamir_threshold(self.threshold, group)

    @property
    def min_survivors(self) -> int:
        """The fewest edges whose masked inputs a round may unmask."""
        return max(2, self.shamir_threshold(self.participants))


def default_neighbours(n: int) -> int:
    """``2 * ceil(log2 n)`` neighbours, the SecAgg+ choice (capped by ``n - 1`` by the graph)."""
    return 2 * max(1, math.ceil(math.log2(n)))


def shamir_threshold(threshold: float, group: int) -> int:
    """Shares needed out of ``group`` holders: ``floor(threshold * group) + 1``, at most all."""
    return min(group, math.floor(threshold * group) + 1)


def failure_bound(n: int, k: int, threshold: float, dropout: float) -> float:
    """Union bound on a round failing when each edge drops independently with ``dropout``.

    A round fails when some edge's secret cannot be reconstructed: more than
    ``k - t`` of its ``k`` neighbours dropped. Summed over the ``n`` edges, capped at 1.
    """
    t = shamir_threshold(threshold, k)
    tail = sum(
        math.comb(k, j) * dropout**j * (1 - dropout) ** (k - j) for j in range(k - t + 1, k + 1)
    )
    return min(1.0, n * tail)


def neighbours_for(n: int, threshold: float, dropout: float | None) -> int:
    """The neighbour count for ``n`` edges: ``2 * ceil(log2 n)``, grown (by 2) until
    :func:`failure_bound` is at most :data:`ROUND_FAILURE_TARGET` for ``dropout``; the
    caller caps it at ``n - 1`` (a complete graph)."""
    k = default_neighbours(n)
    if dropout is None:
        return k
    while k < n - 1 and failure_bound(n, k, threshold, dropout) > ROUND_FAILURE_TARGET:
        k += 2
    return k


def max_quant_bits(n: int) -> int:
    """The most bits per value such that ``n`` values of ``2**bits - 1`` sum below 2**32."""
    bits = MODULUS_BITS - 1
    while bits > 0 and n * ((1 << bits) - 1) >= MODULUS:
        bits -= 1
    return bits


def round_params(config: SecAggConfig, participants: int) -> RoundParams:
    """Resolve ``config`` for a cohort of ``participants`` edges, refusing overflow."""
    if participants < MIN_PARTICIPANTS:
        raise ConfigError(
            f"secure aggregation needs at least {MIN_PARTICIPANTS} edges, got {participants}"
        )
    bits = max_quant_bits(participants)
    if config.quant_bits is not None:
        if config.quant_bits > bits:
            raise ConfigError(
                f"secagg quant_bits={config.quant_bits} overflows 2**32 when {participants} "
                f"updates are summed; at most {bits} bits fit"
            )
        bits = config.quant_bits
    if bits < 1:
        raise ConfigError(f"{participants} edges leave no quantisation bits in 2**32")
    k = config.neighbours
    if k is None:
        k = neighbours_for(participants, config.threshold, config.expected_dropout)
    return RoundParams(
        participants=participants,
        neighbours=min(k, participants - 1),
        clip_norm=config.clip_norm,
        quant_bits=bits,
        stochastic_rounding=config.stochastic_rounding,
        threshold=config.threshold,
    )


def normalise_strategy(strategy: str) -> str:
    """``"Trimmed-Mean"`` -> ``"trimmed_mean"``: lower case, ``-`` and spaces to ``_``."""
    return strategy.strip().lower().replace("-", "_").replace(" ", "_")


def check_compatible(strategy: str, trainer_clip: bool) -> None:
    """Refuse settings secure aggregation cannot honour, with a message that says why.

    ``strategy`` is the trainer's aggregation strategy name; ``trainer_clip`` whether the
    trainer is configured to clip each update itself. Raises :class:`ConfigError`.
    """
    name = normalise_strategy(strategy)
    if name in ROBUST_STRATEGIES:
        raise ConfigError(
            f"secure aggregation cannot be combined with strategy {strategy!r}: "
            f"{ROBUST_STRATEGIES[name]}, and the trainer only ever sees the sum; "
            f"turn secure aggregation off for this model or use one of "
            f"{', '.join(sorted(SUM_STRATEGIES))}"
        )
    if name not in SUM_STRATEGIES:
        raise ConfigError(
            f"secure aggregation does not know strategy {strategy!r}; it supports "
            f"{', '.join(sorted(SUM_STRATEGIES))}"
        )
    if trainer_clip:
        raise ConfigError(
            "secure aggregation cannot be combined with trainer-side clipping of individual "
            "updates: the trainer never sees an individual update; edges clip to "
            "secagg clip_norm instead (central DP noise on the sum still applies)"
        )
