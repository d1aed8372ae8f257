"""Bounds on what one update can do to a round: its weight and its norm.

An update's sample count is the edge's own claim (signed, but self-reported) and FedAvg
and its relatives weigh by it, so an edge claiming 1e12 examples would be the whole mean
(issue #16, finding 4); an edge that scales its delta up moves the model as far as it
likes. So every update of a round is bounded before it is folded:

- its weight is its claim capped at ``max_samples`` and at ``sample_ratio`` times the
  median (capped) claim of the round;
- its norm is clipped to ``norm_ratio`` times the median norm of the round, and to
  ``clip_norm`` when that is set.

The medians are over every update of the round so far, the current one included, so one
edge (or any minority) cannot move them far. Strategies that stream fold each update
once, so the first ``warmup`` updates of a round are held back until ``warmup`` are in,
or the round closes, and folded then with the medians of all of them: an edge that
comes first gains nothing. The held ones wait in unlinked temporary files
(:func:`trainer.rounds.spill`: ``4 * (warmup - 1) * dim`` bytes of disk, no memory
until they are folded, one at a time).

Central DP (``dp_fedavg``) keeps only the absolute bounds: its sensitivity analysis
needs each edge's contribution bounded independently of the others, which a median of
the round is not (the service turns the relative bounds off for it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.errors import TrainerError
from trainer.settings import trainer_default


@dataclass(frozen=True)
class UpdateBounds:
    """The bounds every update of a round is held to (see the module docstring).

    ``None`` turns a relative bound (or the absolute norm bound) off."""

    max_samples: int = trainer_default("max_samples_per_update")
    sample_ratio: float | None = trainer_default("sample_weight_ratio")
    norm_ratio: float | None = trainer_default("update_norm_ratio")
    clip_norm: float | None = trainer_default("update_clip_norm")
    warmup: int = trainer_default("bounds_warmup")

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.warmup < 1:
            raise TrainerError("bad-round-policy", "max_samples and warmup must be >= 1")
        for name in ("sample_ratio", "norm_ratio", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise TrainerError("bad-round-policy", f"{name} must be a number > 0 or unset")
        if self.sample_ratio is not None and self.sample_ratio < 1:
            raise TrainerError("bad-round-policy", "sample_ratio must be >= 1 (or unset)")
        if self.norm_ratio is not None and self.norm_ratio < 1:
            raise TrainerError("bad-round-policy", "norm_ratio must be >= 1 (or unset)")

    @property
    def relative(self) -> bool:
        """Whether a bound depends on the round's other updates (then the first
        ``warmup`` updates are held back)."""
        return self.sample_ratio is not None or self.norm_ratio is not None

    def capped_claim(self, samples: int) -> int:
        """A claimed sample count within ``[1, max_samples]``."""
        return min(max(1, int(samples)), self.max_samples)

    def weight(self, samples: int, claims: Sequence[int]) -> float:
        """The weight of a claim of ``samples`` in a round whose claims are ``claims``
        (the current one included)."""
        own = float(self.capped_claim(samples))
        if self.sample_ratio is None or not claims:
            return own
        typical = _median([float(self.capped_claim(c)) for c in claims])
        return min(own, self.sample_ratio * typical)

    def norm_limit(self, norms: Sequence[float]) -> float | None:
        """The largest norm an update may keep in a round whose norms are ``norms`` (the
        current one included); None: no bound."""
        limits = [] if self.clip_norm is None else [self.clip_norm]
        if self.norm_ratio is not None and norms:
            typical = _median(list(norms))
            if typical > 0:
                limits.append(self.norm_ratio * typical)
        return min(limits) if limits else None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
