"""Rounds of one model, sans-IO: open, weigh and fold updates, decide when to close.

Synchronous rounds sample edges, wait for ``min_updates`` until a deadline (closing early
once every sampled edge has reported) and fold each update weighted by its sample count.
Asynchronous (buffered) aggregation accepts updates from any edge trained on a version at
most ``max_staleness`` behind the current one (one update per edge per buffer), weighs
them by samples times ``(1 + staleness) ** -staleness_exponent`` and closes a buffer
when it holds ``buffer_size`` updates, or when ``deadline_s`` (the buffer timeout) has
passed and it holds at least ``min_updates``; short of that it keeps waiting.
Every announcement carries the client recipe (:func:`told_recipe`): the strategy's
client-side parameters (FedProx's ``mu``) and the trainer's local recipe settings.
The service (``trainer.service``) does the I/O: announcing, ingesting, releasing.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fedcore.wire import ClientRecipe, RoundAnnouncement, round_id, within_staleness
from trainer.aggregate import WeightedSum, scale_step, update_norm
from trainer.bounds import UpdateBounds
from trainer.errors import TrainerError, UpdateRejected
from trainer.settings import trainer_default
from trainer.strategies.base import RoundState, ServerState, Strategy


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds of a model run (from the trainer's settings: ``policy_of`` in
    :mod:`trainer.books`; the defaults here are those settings' defaults)."""

    mode: Literal["sync", "async"] = trainer_default("round_mode")
    min_updates: int = trainer_default("min_updates")
    deadline_s: float = trainer_default("round_deadline_s")
    sample_fraction: float = trainer_default("sample_fraction")
    buffer_size: int = trainer_default("buffer_size")
    max_staleness: int = trainer_default("max_staleness")
    staleness_exponent: float = trainer_default("staleness_exponent")
    step_backoff: float = trainer_default("step_backoff")
    """After a held round the next candidate takes this share of its server step (again
    after each hold, down to :data:`MIN_STEP_SCALE`); each release doubles it back up to
    the full step. 1.0 turns it off."""
    bounds: UpdateBounds = field(default_factory=UpdateBounds)
    """What one update may weigh and how long it may be (:mod:`trainer.bounds`)."""
    recipe: ClientRecipe = field(default_factory=ClientRecipe)
    """The local recipe the trainer tells edges (unset fields: the edge's own)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.step_backoff <= 1.0:
            raise TrainerError("bad-round-policy", "step_backoff must be in (0, 1]")
        if self.min_updates < 1 or self.buffer_size < 1 or self.max_staleness < 0:
            raise TrainerError("bad-round-policy", "min_updates and buffer_size must be >= 1")
        if not (0.0 < self.sample_fraction <= 1.0) or self.deadline_s <= 0:
            raise TrainerError("bad-round-policy", "sample_fraction in (0, 1], deadline_s > 0")


@dataclass(frozen=True)
class Contribution:
    """What a folded update leaves in the round record (never the update itself)."""

    update_id: str
    edge_id: str
    samples: int
    base_version: int
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    norm: float = 0.0
    """The update's L2 norm as it came (before any bound)."""


@dataclass(frozen=True)
class SecAggOutcome:
    """What a securely aggregated round folded: how many edges' masked updates are in
    the sum (``survivors``) and how many shared keys but sent none (``dropped``)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass
class OpenRound:
    """The open round: its announcement and what has been folded into it."""

    announcement: RoundAnnouncement
    state: RoundState
    folded: dict[str, Contribution] = field(default_factory=dict)
    secagg: SecAggOutcome | None = None
    held: dict[str, tuple[Contribution, NDArray[np.float32]]] = field(default_factory=dict)
    """Updates accepted but not folded yet: the first ones of a round wait until the
    medians their bounds need are known (:mod:`trainer.bounds`). Each waits in an unlinked
    temporary file (:func:`spill`), not in memory. Not checkpointed: after a restart the
    ledger's records bring them back from the stream."""
    closing_ts: float | None = None
    """Set when the round stopped taking updates (:meth:`RoundBook.begin_close`); closing
    takes seconds (candidate, gate, export, upload) and nothing may join meanwhile."""
    server_before: ServerState | None = None
    """The strategy's server state before :meth:`RoundBook.finalize` stepped it (momentum,
    moments): :meth:`RoundBook.hold` puts it back, so a held candidate leaves no step."""

    @property
    def round(self) -> int:
        return self.announcement.round

    def edges(self) -> set[str]:
        return {c.edge_id for c in self.folded.values()} | {
            c.edge_id for c, _ in self.held.values()
        }

    def count(self) -> int:
        """Updates accepted into the round, held ones included."""
        return len(self.folded) + len(self.held)

    def contributions(self) -> list[Contribution]:
        return [*self.folded.values(), *(c for c, _ in self.held.values())]


def sample_edges(
    edges: list[str], fraction: float, rng: random.Random, minimum: int = 1
) -> list[str] | None:
    """A sorted sample of ``ceil(fraction * n)`` (at least ``minimum``, at most all) of
    the edges alive; None (anyone) when no edge is known yet."""
    if not edges:
        return None
    k = min(len(edges), max(minimum, math.ceil(fraction * len(edges))))
    return sorted(rng.sample(sorted(edges), k))


CLIENT_OPTIONS: dict[str, dict[str, str]] = {"fedprox": {"mu": "proximal_mu"}}
"""Per strategy: which of its options are client-side, and the recipe field each sets."""


def told_recipe(strategy: Strategy, recipe: ClientRecipe) -> ClientRecipe | None:
    """What a round's edges are told to train with: ``recipe``, its unset fields filled
    from the strategy's client-side options (:data:`CLIENT_OPTIONS`); None when it says
    nothing."""
    options = strategy.options()
    fields = {
        name: options[option]
        for option, name in CLIENT_OPTIONS.get(strategy.name, {}).items()
        if option in options and getattr(recipe, name) is None
    }
    told = recipe.model_copy(update=fields) if fields else recipe
    return told if told.model_dump(exclude_none=True) else None


def staleness_weight(samples: int, staleness: int, exponent: float) -> float:
    """``samples * (1 + staleness) ** -exponent``: older bases count less."""
    return float(samples) * float((1.0 + staleness) ** (-exponent))


MIN_STEP_SCALE = 0.125


def spill(update: NDArray[np.float32]) -> NDArray[np.float32]:
    """A read-only copy of ``update`` in an unlinked file under the temporary directory
    (``TMPDIR``), mapped lazily: it takes no memory until it is read, and its pages go
    when the returned array does. On a tmpfs ``TMPDIR`` the copy is in memory again."""
    with tempfile.TemporaryFile(prefix="fedgate-held-") as f:
        np.ascontiguousarray(update, dtype=np.float32).tofile(f)
        f.flush()
        # the mapping keeps its own descriptor: closing the file leaves it valid
        return np.memmap(f, dtype=np.float32, mode="r", shape=(update.size,))


class RoundBook:
    """Round bookkeeping for one model over a strategy and the current global version.

    A round ends in one call: :meth:`release` (a new version), :meth:`hold` (the candidate
    was not released) or :meth:`abandon` (the round failed). Each changes together what a
    round's end changes: the base version and the digest history, the strategy's server
    state, and ``step_scale``, which shrinks the server step after a held candidate and
    grows it back after a release: a held round usually means the step overshot, and the
    next round, trained from the same base on more data, would overshoot further with
    the full step.
    """

    def __init__(
        self,
        model: str,
        policy: RoundPolicy,
        strategy: Strategy,
        *,
        version: int,
        digest: str,
        params: NDArray[Any],
        next_round: int = 1,
        seed: int | None = None,
        history: Mapping[int, str] | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.strategy = strategy
        self.version = version
        self.digest = digest
        self.params = params
        self.newest = version
        """The highest version number released so far: the next release is ``newest + 1``
        even after :meth:`rebase` went back to an older base (numbers are signed and
        published; one is never given twice)."""
        self.next_round = next_round
        self.step_scale = 1.0
        self.history: dict[int, str] = {**(history or {}), version: digest}
        """Digest of each version released (those before this book's from ``history``):
        an asynchronous round takes updates based on a recent one
        (:func:`fedcore.wire.within_staleness`) whose digest is the one it was released
        with."""
        self.current: OpenRound | None = None
        self.reference: list[Contribution] = []
        """The last closed round's contributions: their claims and norms join every median
        of the next round, so updates that come first cannot set the medians alone."""
        self._rng = random.Random(seed)  # noqa: S311 - client sampling, not a secret

    def open(
        self,
        alive: list[str],
        now: float | None = None,
        *,
        secure: bool = False,
        min_sample: int = 1,
    ) -> RoundAnnouncement:
        """Open the next round over ``alive`` (edge ids the roster has seen alive) and announce it.

        ``secure``: a securely aggregated (sync) round; its sample has at least
        ``min_sample`` edges and the aggregate arrives through :meth:`fold_secagg`."""
        t = time.time() if now is None else now
        p = self.policy
        sync = p.mode == "sync"
        if secure and not sync:
            raise TrainerError("bad-round-policy", "secure aggregation needs sync rounds")
        sampled = sample_edges(alive, p.sample_fraction, self._rng, min_sample) if sync else None
        announcement = RoundAnnouncement(
            model=self.model,
            round=self.next_round,
            mode=p.mode,
            base_version=self.version,
            base_digest=self.digest,
            opened_ts=t,
            deadline_ts=t + p.deadline_s,
            sampled=sampled,
            min_updates=p.min_updates if sync else min(p.min_updates, p.buffer_size),
            buffer_size=1 if sync else p.buffer_size,
            max_staleness=0 if sync else p.max_staleness,
            secure=secure,
            recipe=told_recipe(self.strategy, p.recipe),
        )
        state = self.strategy.start(
            self.params.size, round_id=round_id(self.model, self.next_round)
        )
        self.current = OpenRound(announcement, state)
        self.next_round += 1
        return announcement

    def accepts_base(self, base_version: int) -> bool:
        """True when an update trained from ``base_version`` may join the open round."""
        limit = self.policy.max_staleness if self.policy.mode == "async" else 0
        return within_staleness(self.version, base_version, limit)

    def fold(self, contribution: Contribution, vector: NDArray[Any]) -> Contribution:
        """Fold one accepted update within the round's bounds; returns the contribution
        recorded (weight 0 while it is held back, see :mod:`trainer.bounds`).

        Folding an update id the round holds changes nothing; a second update of an edge
        that contributed already is refused (``second-update``): an asynchronous buffer
        takes updates signed for earlier rounds, which the ledger keys apart. A round being
        closed takes no new update (``round-closed``). An invalid vector is refused
        (``UpdateRejected``) before anything changes."""
        rnd = self._require_open()
        known = (
            rnd.folded.get(contribution.update_id)
            or rnd.held.get(contribution.update_id, (None, None))[0]
        )
        if known is not None:
            return known
        if rnd.closing_ts is not None:
            raise UpdateRejected(
                "round-closed", f"round {rnd.round} of {self.model} is closing: too late"
            )
        if contribution.edge_id in rnd.edges():
            raise UpdateRejected(
                "second-update",
                f"edge {contribution.edge_id!r} already contributed to round {rnd.round}",
            )
        update = np.asarray(vector, dtype=np.float32)
        norm = update_norm(update, self.params.size)
        arrived = replace(contribution, weight=0.0, norm=norm)
        b = self.policy.bounds
        if b.relative and self.strategy.streams and rnd.count() < b.warmup:
            if rnd.count() + 1 >= b.warmup:  # the last of the warm-up folds at once
                rnd.held[arrived.update_id] = (arrived, update)
                self.fold_held()
            else:
                rnd.held[arrived.update_id] = (arrived, spill(update))
            return rnd.folded.get(arrived.update_id, arrived)
        return self._fold_bounded(rnd, arrived, update)

    def begin_close(self, now: float | None = None) -> float:
        """The open round takes no more updates (:meth:`fold` refuses ``round-closed``);
        it stays :attr:`current` until :meth:`release`, :meth:`hold` or :meth:`abandon`.
        Returns when it stopped taking them (its record's ``closed_ts``)."""
        rnd = self._require_open()
        if rnd.closing_ts is None:
            rnd.closing_ts = time.time() if now is None else now
        return rnd.closing_ts

    def fold_held(self) -> None:
        """Fold the updates held back, with the bounds of every update the round has
        (when the warm-up is complete, or the round closes with fewer)."""
        rnd = self._require_open()
        everyone = [*self.reference, *rnd.contributions()]
        held, rnd.held = list(rnd.held.values()), {}
        while held:  # each one's pages are read in and dropped before the next
            arrived, update = held.pop(0)
            self._fold_bounded(rnd, arrived, update, everyone)
            del update

    def _fold_bounded(
        self,
        rnd: OpenRound,
        arrived: Contribution,
        update: NDArray[np.float32],
        everyone: list[Contribution] | None = None,
    ) -> Contribution:
        """Fold ``arrived`` with its weight and norm bounded by the round's medians over
        ``everyone`` (default: the last round's, the folded updates and this one)."""
        among = (
            everyone if everyone is not None else [*self.reference, *rnd.folded.values(), arrived]
        )
        b = self.policy.bounds
        weight = staleness_weight(
            round(b.weight(arrived.samples, [c.samples for c in among])),
            self.version - arrived.base_version,
            self.policy.staleness_exponent,
        )
        limit = b.norm_limit([c.norm for c in among])
        if limit is not None and arrived.norm > limit:
            update = update * np.float32(limit / arrived.norm)
        recorded = replace(arrived, weight=weight, metrics=dict(arrived.metrics))
        self.strategy.fold(rnd.state, update, weight)
        rnd.folded[recorded.update_id] = recorded
        return recorded

    def fold_secagg(self, total: NDArray[Any], outcome: SecAggOutcome, sensitivity: float) -> None:
        """Fold a secure round's aggregate: the unweighted sum of the survivors' updates
        (example counts stay on the edges, so the mean is unweighted, as in DP-FedAvg).

        Each survivor is recorded as a contribution with weight 1 and no sample count."""
        rnd = self._require_open()
        if not rnd.announcement.secure or rnd.secagg is not None or rnd.count():
            raise TrainerError("not-secure", f"{self.model}: round {rnd.round} takes no secure sum")
        state = rnd.state
        if not isinstance(state, WeightedSum):
            raise TrainerError("not-secure", f"{self.strategy.name} cannot fold a sum")
        state.fold_sum(total, len(outcome.survivors), sensitivity=sensitivity)
        rnd.secagg = outcome
        for edge in outcome.survivors:
            update_id = f"secagg-{self.model}-{rnd.round}-{edge}"
            rnd.folded[update_id] = Contribution(update_id, edge, 0, self.version, 1.0)

    def next_step(self, now: float | None = None) -> Literal["wait", "close", "fail"]:
        """``close`` when enough updates are in, ``fail`` past the deadline without them.

        An async buffer closes when full, or past its timeout (``deadline_ts``) with at
        least ``min_updates``; it never fails: short of that it waits for more."""
        rnd = self._require_open()
        t = time.time() if now is None else now
        a = rnd.announcement
        count = rnd.count()
        if self.policy.mode == "async":
            full = count >= a.buffer_size
            return "close" if full or (t >= a.deadline_ts and count >= a.min_updates) else "wait"
        # invited edges all in, or no edge known at opening: quorum is enough
        everyone = a.sampled is None or set(a.sampled) <= rnd.edges()
        if count >= a.min_updates and (everyone or t >= a.deadline_ts):
            return "close"
        if t >= a.deadline_ts:
            return "fail" if count < a.min_updates else "close"
        return "wait"

    def finalize(self) -> NDArray[Any]:
        """The candidate parameters from the open round (the round stays open until
        :meth:`release`, :meth:`hold` or :meth:`abandon`). Stepping the server optimiser
        here is undone by :meth:`hold`. Once: the round's state (its running sum) is
        discarded here, so a second call, or a checkpoint of the round, raises
        ``round-spent`` (the checkpoint on disk still holds the sum of the last fold)."""
        rnd = self._require_open()
        self.fold_held()
        if rnd.server_before is None:
            rnd.server_before = {k: v.copy() for k, v in self.strategy.server_state().items()}
        out: NDArray[Any] = self.strategy.finalize(rnd.state, self.params)
        if self.step_scale != 1.0:  # base + scale * (out - base), in place a slice at a time
            out = scale_step(out, self.params, self.step_scale)
        # the gate, export and upload that follow never read the sum (2x the model): a
        # restart resumes the round from its checkpoint on disk, held updates from the
        # ledger, and hold/release/abandon end the round without it
        rnd.state.discard()
        return out

    def release(self, version: int, digest: str, params: NDArray[Any]) -> None:
        """The candidate was released as ``version``: it is the new base (and joins the
        digest history), the step grows back towards the full one, the round closes."""
        self._require_open()
        self.history[version] = digest
        self.version, self.digest, self.params = version, digest, params
        self.newest = max(self.newest, version)
        self.step_scale = min(1.0, self.step_scale / self.policy.step_backoff)
        self._close()

    def hold(self) -> None:
        """The candidate was held: the strategy's server state is as before
        :meth:`finalize`, the next candidate takes a shorter step, the round closes
        without a new version."""
        self._require_open()
        self._restore_server_state()
        self.step_scale = max(MIN_STEP_SCALE, self.step_scale * self.policy.step_backoff)
        self._close()

    def rebase(self, version: int, digest: str, params: NDArray[Any]) -> OpenRound | None:
        """Base the next rounds on ``version``, a version released before (the one the
        fleet serves after a rollback); returns the open round, abandoned.

        The strategy's server state (momentum, moments) is reset: it carries the steps
        that led to the dropped version. The step shrinks as after a held candidate.
        :attr:`newest` is kept: the next release still gets a fresh number."""
        if version > self.newest:
            raise TrainerError("bad-rebase", f"{self.model}: version {version} was never released")
        abandoned = self.current
        self.version, self.digest, self.params = version, digest, params
        self.strategy.load_server_state({})
        self.step_scale = max(MIN_STEP_SCALE, self.step_scale * self.policy.step_backoff)
        self.current = None  # its updates came from the dropped version: not a reference
        return abandoned

    def abandon(self) -> None:
        """Close the open round without a new version (it failed: the step is kept; a
        candidate finalized meanwhile leaves no server state)."""
        self._restore_server_state()
        self._close()

    def _restore_server_state(self) -> None:
        rnd = self.current
        if rnd is not None and rnd.server_before is not None:
            self.strategy.load_server_state(rnd.server_before)
            rnd.server_before = None

    def _close(self) -> None:
        if self.current is not None and self.current.folded:
            self.reference = list(self.current.folded.values())
        self.current = None

    def _require_open(self) -> OpenRound:
        if self.current is None:
            raise TrainerError("no-open-round", f"{self.model}: no round is open")
        return self.current
