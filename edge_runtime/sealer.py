"""From a trained delta to a sealed update: compression with error feedback, then HPKE.

:class:`UpdateSealer` is the edge's one path for an update's bytes. It compresses the
delta (``UPDATE_COMPRESSION``) after adding the error-feedback residual of earlier
rounds, and seals it to the trainer with the suite of the trainer's HPKE public key
(X25519 or ML-KEM-768+X25519, :func:`fedcore.keys.read_hpke_public`), signed with the
edge's identity. The new residual is kept only once the update was published
(:meth:`UpdateSealer.commit`): an update that never left does not count as sent. It is
then written to ``residual_file`` (``.npy``, atomic, no pickle), so an edge restart goes
on with it; an unreadable file is logged and replaced by zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.compression import CompressionSettings, EncodedUpdate, ErrorFeedback, encode_update
from fedcore.envelope import RecipientPublicKey, UpdateHeader, seal_update
from fedcore.errors import ResidualFileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keys:
    """The edge's signing identity and the trainer's HPKE public key."""

    signer: ed25519.Ed25519PrivateKey
    recipient: RecipientPublicKey


@dataclass(frozen=True)
class UpdateFor:
    """Which round and base an update answers."""

    model: str
    round: int
    base_version: int
    base_digest: str


@dataclass(frozen=True)
class Sealed:
    """A sealed update, its encoding, and the residual to keep once it is published."""

    header: UpdateHeader
    envelope: bytes | bytearray  # as sealed: not copied (a large model's is its size again)
    encoded: EncodedUpdate
    feedback: ErrorFeedback


class UpdateSealer:
    """Compresses (with a persisted error-feedback residual) and seals one model's updates."""

    def __init__(
        self,
        *,
        edge_id: str,
        sizes: Sequence[int],
        compression: CompressionSettings,
        keys: Keys,
        residual_file: Path | None = None,
    ) -> None:
        self.edge_id = edge_id
        self.sizes = tuple(sizes)
        self.compression = compression
        self.keys = keys
        self.residual_file = residual_file
        self.feedback = self._restore(sum(self.sizes))

    def _restore(self, size: int) -> ErrorFeedback:
        if self.residual_file is None:
            return ErrorFeedback(size)
        try:
            return ErrorFeedback.load(self.residual_file, size)
        except ResidualFileError as exc:
            log.warning("error-feedback residual dropped: %s", exc)
            return ErrorFeedback(size)

    def seal(
        self,
        delta: NDArray[Any],
        target: UpdateFor,
        *,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> Sealed:
        """Encode ``delta`` plus the residual and seal it for ``target``; the residual is
        not changed until :meth:`commit`."""
        pending = self.feedback.copy()
        encoded = encode_update(delta, self.sizes, self.compression, pending)
        header, envelope = seal_update(
            encoded.data,
            recipient=self.keys.recipient,
            signer=self.keys.signer,
            model=target.model,
            round=target.round,
            edge_id=self.edge_id,
            base_version=target.base_version,
            base_digest=target.base_digest,
            compression=encoded.mode,
            num_samples=num_samples,
            metrics=dict(metrics) if metrics is not None else None,
        )
        return Sealed(header, envelope, encoded, pending)

    def commit(self, sealed: Sealed) -> None:
        """``sealed`` was published: its residual is the one to carry (kept on disk)."""
        self.feedback = sealed.feedback
        if self.residual_file is not None:
            self.feedback.save(self.residual_file)
