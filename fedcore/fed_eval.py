"""Federated evaluation: the centre holds no data, so the edges score a candidate.

When the trainer has no evaluation set for a model, it asks the fleet on
``fedgate.evaluate.<model>`` (a request, :class:`EvalRequest`, signed with the trainer's
Ed25519 version-signing key under its own domain) to score the candidate and the serving
parameters on each edge's local held-out split. An edge answers with aggregates only, in
an :class:`EvalReport` signed with its identity key: how many held-out samples, and the
sums of the task's per-sample metric and loss for both parameter vectors. The trainer
keeps reports from enrolled edges whose signature verifies, at most one per edge, bounds
each edge's count, and decides on the count-weighted means when enough edges and samples
answered (:func:`combine`). No sample, label or prediction leaves an edge.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray
from pydantic import Field, field_validator

from fedcore.edge_id import check_edge_id
from fedcore.wire import _Message

EVAL_PREFIX = "fedgate.evaluate"
REQUEST_DOMAIN = b"fedgate-eval-request-v1\0"
REPORT_DOMAIN = b"fedgate-eval-report-v1\0"
MAX_REQUEST_AGE_S = 120.0
"""An edge ignores a request issued longer ago than this (or this far in the future)."""


def subject(model: str) -> str:
    """The subject the trainer asks ``model``'s edges to evaluate on."""
    return f"{EVAL_PREFIX}.{model}"


def pack(vector: NDArray[Any]) -> str:
    """A flat FP32 vector as base64 of its little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()


def unpack(text: str, size: int) -> NDArray[Any]:
    """The inverse of :func:`pack`, checked to hold ``size`` finite values."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 4 * size:
        raise ValueError(f"parameters have {len(raw) // 4} values, the model has {size}")
    vector: NDArray[Any] = np.frombuffer(raw, dtype="<f4").copy()
    if not np.all(np.isfinite(vector)):
        raise ValueError("parameters are not finite")
    return vector


def _digest(domain: bytes, message: _Message) -> bytes:
    body = message.model_dump_json(exclude={"signature"}).encode()
    return domain + hashlib.sha256(body).digest()


class EvalRequest(_Message):
    """Score ``candidate`` and ``serving`` (packed FP32 vectors) on your held-out split."""

    model: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    round: int = Field(ge=1)
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    issued_ts: float
    candidate: str
    serving: str
    signature: str = ""

    def signed(self, key: ed25519.Ed25519PrivateKey) -> EvalRequest:
        sig = key.sign(_digest(REQUEST_DOMAIN, self)).hex()
        return self.model_copy(update={"signature": sig})

    def verify(self, trainer: ed25519.Ed25519PublicKey, now: float | None = None) -> str | None:
        """None if signed by ``trainer`` and fresh; otherwise why not."""
        try:
            trainer.verify(bytes.fromhex(self.signature), _digest(REQUEST_DOMAIN, self))
        except (InvalidSignature, ValueError):
            return "bad signature"
        age = (time.time() if now is None else now) - self.issued_ts
        if abs(age) > MAX_REQUEST_AGE_S:
            return f"stale ({age:.0f} s old)"
        return None


class EvalReport(_Message):
    """One edge's aggregates for an :class:`EvalRequest` (its ``nonce``)."""

    edge_id: str
    model: str
    round: int = Field(ge=1)
    nonce: str
    count: int = Field(ge=0)
    candidate_sum: float = Field(allow_inf_nan=False)
    serving_sum: float = Field(allow_inf_nan=False)
    candidate_loss_sum: float = Field(allow_inf_nan=False)
    serving_loss_sum: float = Field(allow_inf_nan=False)
    signature: str = ""

    @field_validator("edge_id")
    @classmethod
    def _edge_id(cls, v: str) -> str:
        return check_edge_id(v)

    def signed(self, key: ed25519.Ed25519PrivateKey) -> EvalReport:
        sig = key.sign(_digest(REPORT_DOMAIN, self)).hex()
        return self.model_copy(update={"signature": sig})

    def verify(self, edge: ed25519.Ed25519PublicKey) -> bool:
        try:
            edge.verify(bytes.fromhex(self.signature), _digest(REPORT_DOMAIN, self))
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class FedEvalPolicy:
    """When federated evaluation may decide: at least ``min_edges`` edges and
    ``min_samples`` held-out samples in all; one edge counts for at most
    ``max_samples_per_edge`` samples (a self-reported figure, bounded)."""

    min_edges: int = 2
    min_samples: int = 20
    max_samples_per_edge: int = 5000
    timeout_s: float = 10.0


@dataclass(frozen=True)
class FedEvalResult:
    """Count-weighted means over the edges that answered, or why there are none."""

    edges: int
    samples: int
    candidate: float | None = None
    serving: float | None = None
    candidate_loss: float | None = None
    serving_loss: float | None = None
    shortfall: str | None = None


def combine(reports: list[EvalReport], policy: FedEvalPolicy) -> FedEvalResult:
    """Weighted means of verified reports (one per edge); ``shortfall`` says why not."""
    usable = [r for r in reports if r.count > 0]
    edges = len(usable)
    weights = [min(r.count, policy.max_samples_per_edge) for r in usable]
    samples = sum(weights)
    if edges < policy.min_edges or samples < policy.min_samples:
        return FedEvalResult(
            edges,
            samples,
            shortfall=f"federated evaluation: {edges} edge(s) with {samples} held-out samples "
            f"answered (needs {policy.min_edges} edges and {policy.min_samples} samples)",
        )

    def mean(field: str) -> float:
        # a capped edge keeps its own mean: its sums are scaled to its capped weight
        pairs = zip(usable, weights, strict=True)
        return float(sum(getattr(r, field) * w / r.count for r, w in pairs)) / samples

    return FedEvalResult(
        edges,
        samples,
        mean("candidate_sum"),
        mean("serving_sum"),
        mean("candidate_loss_sum"),
        mean("serving_loss_sum"),
    )
