"""Wire messages on NATS, sans-IO: pure encode/decode, tested without a broker.

Messages are compact JSON validated strictly on decode; a malformed message raises
:class:`WireError` naming the message type and the field.
"""

from __future__ import annotations

import math
import re
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedcore.edge_id import check_edge_id
from fedcore.errors import FedgateError


class WireError(FedgateError):
    """A message on the wire could not be decoded."""

    def __init__(self, message_type: str, detail: str) -> None:
        self.message_type = message_type
        self.detail = detail
        super().__init__(f"malformed {message_type}: {detail}")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise WireError(cls.__name__, f"{where}: {first['msg']}") from None


class LabelTally(_Message):
    """Feedback labels joined on an edge for one version: how many, how many of its answers
    they confirmed (models whose metric is accuracy), and the sum of the model's per-sample
    metric over them (any metric: their mean is ``score / total``). Aggregates only; the
    labels stay on the edge."""

    total: int = Field(default=0, ge=0)
    correct: int = Field(default=0, ge=0)
    score: float = Field(default=0.0, allow_inf_nan=False)


class ModelState(_Message):
    """One model on one edge: ready versions, and versions that failed with the reason.

    ``rollout`` names the rollout whose desired versions (:class:`DesiredVersions`) the
    edge has applied, so ``ready`` and ``failed`` answer that rollout; ``labels`` counts
    feedback labels per version while a rollout has a candidate (the accuracy gate).
    """

    ready: list[int] = Field(default_factory=list)
    failed: dict[int, str] = Field(default_factory=dict)
    rollout: str | None = None
    labels: dict[int, LabelTally] = Field(default_factory=dict)


class Heartbeat(_Message):
    """An edge's periodic announcement: where to reach it and what it serves."""

    edge_id: str
    url: str
    seq: int = Field(ge=0)
    ts: float
    models: dict[str, ModelState]
    inflight: int = Field(default=0, ge=0)
    device: str = "cpu"

    @field_validator("edge_id")
    @classmethod
    def _edge_id(cls, v: str) -> str:
        return check_edge_id(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+$", v):
            raise ValueError(f"url {v!r} must be http(s)://host:port")
        return v


def decode_heartbeat(data: bytes) -> Heartbeat:
    """Decode a heartbeat or raise :class:`WireError`."""
    return Heartbeat.decode(data)


ROUNDS_BUCKET = "fedgate_rounds"
"""KV bucket holding the open round of each model under the key ``<model>``."""


class ClientRecipe(_Message):
    """How the trainer tells the edges of a round to train locally: the client-side
    parameters of its strategy (FedProx's ``proximal_mu``) and its local recipe. Each
    field left out (None) falls back to the edge's setting, then to the model spec's
    recipe. ``max_steps`` bounds the mini-batches of one local run, so an update does not
    grow with the edge's spool."""

    proximal_mu: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    epochs: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    batch_size: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)


def within_staleness(current: int, base: int, max_staleness: int) -> bool:
    """The staleness rule, for trainer and edges alike: an update trained from version
    ``base`` counts while the current base version is ``current`` when it is at most
    ``max_staleness`` versions behind, and not ahead. Sync rounds allow 0; async ones
    announce theirs (:attr:`RoundAnnouncement.max_staleness`)."""
    return 0 <= current - base <= max_staleness


class RoundAnnouncement(_Message):
    """The trainer's word on a model's open round, written to KV ``fedgate_rounds/<model>``.

    ``mode`` ``sync``: edges in ``sampled`` (all edges when None) train from
    ``base_version`` and send one update for ``round`` before ``deadline_ts``.
    ``mode`` ``async``: any edge may send an update whenever it has trained, from any
    version at most ``max_staleness`` behind ``base_version``; the trainer aggregates
    every ``buffer_size`` updates. ``state`` is ``open`` or ``closed``.
    ``secure``: the round is securely aggregated (``docs/secagg.md``): invited edges take
    part in the protocol on ``fedgate.secagg.<model>.*`` and send their update masked
    there, never as a sealed envelope (absent in older messages: False).
    ``deadline_ts``: in a sync round, when edges stop sending; in an async round, when the
    trainer closes a buffer that is not full but holds ``min_updates`` (edges keep sending
    to an async round past it, until the trainer writes the next one).
    ``recipe``: what edges train with (:class:`ClientRecipe`; absent in older messages).
    """

    model: str
    round: int = Field(ge=1)
    mode: str = Field(pattern="^(sync|async)$")
    base_version: int = Field(ge=1)
    base_digest: str = Field(pattern="^[0-9a-f]{64}$")
    opened_ts: float
    deadline_ts: float
    sampled: list[str] | None = None
    min_updates: int = Field(default=1, ge=1)
    buffer_size: int = Field(default=1, ge=1)
    max_staleness: int = Field(default=0, ge=0)
    state: str = Field(default="open", pattern="^(open|closed)$")
    secure: bool = False
    recipe: ClientRecipe | None = None

    def invites(self, edge_id: str) -> bool:
        """True when ``edge_id`` may send an update for this round."""
        return self.state == "open" and (self.sampled is None or edge_id in self.sampled)


MAX_LABEL_VALUES = 4096
"""The most values one feedback label may carry."""

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
"""Request ids that feedback may name: 1-256 printable ASCII characters, no spaces."""


class FeedbackRequest(_Message):
    """A label for a served request, sent by the gateway to the fleet on
    ``fedgate.feedback.<model>`` (or to one edge on ``fedgate.feedback.<model>-<edge>``);
    the edge holding request ``id`` of key ``key`` answers (``FeedbackReply``)."""

    model: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    id: str = Field(pattern=REQUEST_ID.pattern)
    label: int | float | list[float] = Field(
        description="a class index, a number or a vector, as the model's task says"
    )
    weight: float = Field(default=1.0, gt=0.0, le=1000.0, allow_inf_nan=False)
    key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    """The name of the key that asked: the sample is spooled as ``<key>/<id>``."""

    @property
    def spool_id(self) -> str:
        """The id the serving edge spooled the sample under (see ``model.py``'s capture)."""
        return self.id if self.key is None else f"{self.key}/{self.id}"

    @field_validator("label")
    @classmethod
    def _label(cls, v: int | float | list[float]) -> int | float | list[float]:
        values = v if isinstance(v, list) else [v]
        if len(values) > MAX_LABEL_VALUES:
            raise ValueError(f"at most {MAX_LABEL_VALUES} values")
        if not all(math.isfinite(x) for x in values):
            raise ValueError("values must be finite")
        if isinstance(v, int) and v < 0:
            raise ValueError("a class index must not be negative")
        return v


class FeedbackReply(_Message):
    """An edge's answer to a :class:`FeedbackRequest`: ``joined`` (the label is attached to
    its captured sample) or ``expired`` (the sample was evicted). Edges that never saw
    the request stay silent on the fleet's subject and answer ``unknown`` on their own."""

    edge_id: str
    status: str = Field(pattern="^(joined|expired|unknown)$")

    @field_validator("edge_id")
    @classmethod
    def _edge_id(cls, v: str) -> str:
        return check_edge_id(v)


ROUND_LOG_BUCKET = "fedgate_round_log"
"""KV bucket with one :class:`RoundRecord` per closed round, key ``<model>.<round:08d>``."""

LINEAGE_BUCKET = "fedgate_lineage"
"""KV bucket with one :class:`Lineage` per released version, key ``<model>.<version:08d>``."""


class Contributor(_Message):
    """One edge's part in a round: aggregate numbers only, never its data or update."""

    edge_id: str
    samples: int = Field(ge=0)
    base_version: int = Field(ge=1)
    weight: float = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class RoundRecord(_Message):
    """How a round ended: ``released``, ``held`` (gate said no) or ``failed`` (no quorum).

    A securely aggregated round (``secure``) has no per-edge contributions to show beyond
    who survived: ``survivors`` edges' masked updates are in the sum, ``dropped`` edges
    shared keys but sent none (both None when the protocol did not get that far).
    """

    model: str
    round: int = Field(ge=1)
    mode: str
    outcome: str = Field(pattern="^(released|held|failed)$")
    reason: str
    base_version: int = Field(ge=1)
    released_version: int | None = None
    opened_ts: float
    closed_ts: float
    contributors: list[Contributor] = Field(default_factory=list)
    metric: str | None = None
    """the model's gate metric (``accuracy``, ``mae``, ...), from its spec's task"""
    higher_is_better: bool | None = None
    value: float | None = None
    """the candidate's ``metric`` on the evaluation that decided"""
    serving_value: float | None = None
    evaluation: str | None = None
    """which evaluation decided: ``central`` (the trainer's set)"""
    eval_samples: int | None = Field(default=None, ge=0)
    paired_se: float | None = Field(default=None, ge=0)
    """the central gate's paired standard error of ``value - serving_value``"""
    accuracy: float | None = None
    """``value`` when ``metric`` is accuracy (kept for older readers)"""
    loss: float | None = None
    serving_accuracy: float | None = None
    """``serving_value`` when ``metric`` is accuracy (kept for older readers)"""
    epsilon: float | None = None
    secure: bool = False
    survivors: int | None = Field(default=None, ge=0)
    dropped: int | None = Field(default=None, ge=0)
    step_scale: float | None = Field(default=None, gt=0, le=1)
    recipe: ClientRecipe | None = None
    """what the round's announcement told edges to train with (each contributor's
    ``metrics`` say what it used: ``recipe_mu``, ``recipe_lr``, ...)"""


class Lineage(_Message):
    """Where a released version came from."""

    model: str
    version: int = Field(ge=1)
    parent_version: int | None
    round: int | None
    digest: str
    strategy: str
    contributors: list[Contributor] = Field(default_factory=list)
    samples: int = 0
    metric: str | None = None
    value: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    epsilon: float | None = None
    created_ts: float


def round_id(model: str, round_no: int) -> str:
    """The id of round ``round_no`` of ``model``: ``<model>/round-<n>``. Bound into every
    secure-aggregation signature (an answer for one round is useless in another) and
    the label of the round's aggregation state (logs, the privacy ledger)."""
    return f"{model}/round-{round_no}"


def round_key(model: str, round_no: int) -> str:
    """KV key of a round record (zero-padded so keys sort by round)."""
    return f"{model}.{round_no:08d}"


def version_key(model: str, version: int) -> str:
    """KV key of a version's lineage."""
    return f"{model}.{version:08d}"


MODEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
"""Model names: they appear in NATS subjects and KV keys."""
ROLLOUT_ID = re.compile(r"^r-[0-9a-f]{12}$")
"""Rollout ids, as the gateway makes them."""

ROLLOUTS_BUCKET = "fedgate_rollouts"
"""KV bucket of the gateway's rollouts: key ``<model>`` holds a model's latest rollout (written
with compare-and-set, so one rollout per model is active), ``<model>.<id>`` a copy of each."""

DESIRED_BUCKET = "fedgate_desired"
"""KV bucket with the versions every edge serving a model should load, key ``<model>``
(:class:`DesiredVersions`); the gateway writes it, edges watch it."""


class DesiredVersions(_Message):
    """The versions of ``model`` edges should serve: ``stable`` and, while a rollout stages
    or observes its canary, ``candidate``. Edges install the missing ones (verified first),
    remove the others from their repository, and name ``rollout`` in their heartbeat
    (:attr:`ModelState.rollout`) once applied."""

    model: str = Field(pattern=MODEL_NAME.pattern)
    stable: int = Field(ge=1)
    candidate: int | None = Field(default=None, ge=1)
    rollout: str = Field(pattern=ROLLOUT_ID.pattern)
    ts: float

    def versions(self) -> list[int]:
        """The versions to serve, ascending."""
        return sorted({self.stable} | ({self.candidate} if self.candidate is not None else set()))
