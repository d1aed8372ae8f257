"""The bridge between the ingestor and the round books: which round is open, fold, persist.

:class:`RoundDriver` is the ingestor's ``RoundSource`` and ``Aggregator``. Each fold is
checkpointed (fsync) before the ingestor acknowledges the message, so an acknowledged
update is always in the checkpoint or, if the trainer died between the ledger record and
the checkpoint, refolded from the stream on restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedcore.envelope import UpdateHeader
from fedcore.errors import EnvelopeError
from fedcore.wire import within_staleness
from trainer import checkpoint
from trainer.errors import UpdateRejected
from trainer.ingest import AcceptedUpdate
from trainer.opener import RoundTarget
from trainer.rounds import Contribution, RoundBook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AsyncTarget(RoundTarget):
    """Buffered asynchronous aggregation: a base up to ``max_staleness`` versions old is
    welcome (:func:`fedcore.wire.within_staleness`), as long as its digest is the one
    that version was released with (the book's ``history``)."""

    max_staleness: int = 0
    digests: tuple[tuple[int, str], ...] = ()

    def check(self, header: UpdateHeader) -> None:
        if header.model != self.model:
            raise EnvelopeError("wrong-model", f"update is for model {header.model!r}")
        if header.round > self.round:
            raise EnvelopeError(
                "wrong-round", f"update is for round {header.round}, open {self.round}"
            )
        if not within_staleness(self.base_version, header.base_version, self.max_staleness):
            raise EnvelopeError(
                "stale-round",
                f"update is based on version {header.base_version}, current {self.base_version}, "
                f"staleness limit {self.max_staleness}",
            )
        if dict(self.digests).get(header.base_version) != header.base_digest:
            raise EnvelopeError(
                "base-mismatch", f"digest of base version {header.base_version} does not match"
            )


@dataclass(frozen=True)
class SecAggTarget(RoundTarget):
    """A securely aggregated round: edges send masked inputs over the secure-aggregation
    subjects, so any sealed update for it is refused (and never folded)."""

    def check(self, header: UpdateHeader) -> None:
        raise EnvelopeError(
            "wrong-round",
            f"round {self.round} of {self.model} is securely aggregated: sealed updates "
            "are refused (its edges send masked inputs)",
        )


class RoundDriver:
    """Round books by model, their checkpoints, and the ingestor-facing protocol."""

    def __init__(
        self, books: dict[str, RoundBook], state_dir: Path, sizes: dict[str, tuple[int, ...]]
    ) -> None:
        self.books = books
        self.state_dir = state_dir
        self.sizes = sizes

    def checkpoint_dir(self, model: str) -> Path:
        return self.state_dir / "checkpoints" / model

    def save(self, model: str) -> None:
        checkpoint.save(self.checkpoint_dir(model), self.books[model])

    def target(self, model: str) -> RoundTarget | None:
        book = self.books.get(model)
        if book is None or book.current is None or book.current.closing_ts is not None:
            return None  # none open, or the open one is being closed
        a = book.current.announcement
        if a.mode == "async":
            return AsyncTarget(
                model,
                a.round,
                book.version,
                book.digest,
                self.sizes[model],
                max_staleness=a.max_staleness,
                digests=tuple(sorted(book.history.items())),
            )
        kind = SecAggTarget if a.secure else RoundTarget
        return kind(model, a.round, a.base_version, a.base_digest, self.sizes[model])

    def fold(self, update: AcceptedUpdate) -> None:
        h = update.header
        book = self.books[h.model]
        if not book.accepts_base(h.base_version):  # checked against a round since rebased
            raise UpdateRejected(
                "stale-round", f"update is based on version {h.base_version}, now {book.version}"
            )
        contribution = Contribution(
            h.update_id, h.edge_id, h.num_samples, h.base_version, 0.0, dict(h.metrics or {})
        )
        recorded = book.fold(contribution, update.vector)
        self.save(h.model)
        held = book.current is not None and recorded.update_id in book.current.held
        log.info(
            "update held until the round's bounds are known" if held else "update folded",
            extra={
                "model": h.model,
                "round": h.round,
                "edge": h.edge_id,
                "weight": recorded.weight,
            },
        )
