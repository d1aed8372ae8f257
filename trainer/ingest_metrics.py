"""Prometheus metrics of update ingestion, on a registry the caller passes in.

- ``fedgate_trainer_updates_accepted_total``: updates folded into a round;
- ``fedgate_trainer_updates_rejected_total{reason}``: updates refused, by reason (every
  known reason is exported from the start, at 0);
- ``fedgate_trainer_updates_retried_total``: messages left for redelivery after a
  transient failure (NATS unavailable, say): not a rejection, nothing is lost;
- ``fedgate_trainer_update_wire_bytes{path}``: envelope sizes, ``inline`` or ``object``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from fedcore.errors import EnvelopeError

INGEST_REASONS = frozenset(
    {
        "revoked-edge",
        "duplicate",
        "second-update",
        "subject-mismatch",
        "bad-subject",
        "bad-pointer",
        "object-missing",
        "object-unreadable",
        "no-open-round",
        "fold-failed",
    }
)
"""Rejection reasons of the ingestor on top of :attr:`EnvelopeError.REASONS`."""

REJECTION_REASONS = tuple(sorted(EnvelopeError.REASONS | INGEST_REASONS))

_BYTE_BUCKETS = tuple(float(4**k * 1024) for k in range(11))  # 1 KiB .. 1 GiB


class IngestMetrics:
    """The counters and histogram above, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "fedgate_trainer_updates_accepted",
            "Updates verified, recorded in the ledger and folded into a round",
            registry=registry,
        )
        self.rejected = Counter(
            "fedgate_trainer_updates_rejected",
            "Updates refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.retried = Counter(
            "fedgate_trainer_updates_retried",
            "Messages left for redelivery after a transient failure",
            registry=registry,
        )
        self.wire_bytes = Histogram(
            "fedgate_trainer_update_wire_bytes",
            "Size of received update envelopes in bytes",
            ["path"],
            buckets=_BYTE_BUCKETS,
            registry=registry,
        )
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason=reason)
        for path in ("inline", "object"):
            self.wire_bytes.labels(path=path)
