"""Counters of the trainer's secure rounds: why they failed, and who misbehaved in them."""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter

# Reasons a secure round fails with that every model exports from the start, at 0.
FAILURE_REASONS = ("below-threshold", "out-of-range", "reconstruction-mismatch")


class SecAggMetrics:
    """How secure rounds failed, by the protocol's reason, and the edges caught
    misbehaving in them (a share that did not open, a wrong share revealed)."""

    def __init__(self, registry: CollectorRegistry, models: Collection[str]) -> None:
        self.failed = Counter(
            "fedgate_trainer_secagg_failed",
            "Secure rounds that failed or were refused, by reason (out-of-range: the "
            "unmasked sum was one the survivors could not have produced; never released)",
            ["model", "reason"],
            registry=registry,
        )
        self.culprits = Counter(
            "fedgate_trainer_secagg_culprits",
            "Edges excluded from secure rounds or outvoted at unmasking for misbehaving",
            ["model"],
            registry=registry,
        )
        for model in models:
            self.culprits.labels(model)
            for reason in FAILURE_REASONS:
                self.failed.labels(model, reason)

    def observe(self, model: str, failure: str | None, culprits: int) -> None:
        """Count a finished round: its failure reason (None: it succeeded) and how many
        edges it caught misbehaving."""
        if failure is not None:
            self.failed.labels(model, failure).inc()
        self.culprits.labels(model).inc(culprits)
