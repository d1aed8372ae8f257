"""The trainer's errors: one base, :class:`TrainerError`, with structured fields.

Every error carries a short machine-readable ``reason`` (used as a metrics label and in
log records) out of the ``Literal`` its class declares, and a human ``detail``
(:class:`fedcore.errors.ReasonedError`); subclasses add the fields callers act on.
Callers never parse messages.
"""

from __future__ import annotations

from typing import Literal

from fedcore.errors import ReasonedError

UpdateRejectedReason = Literal[
    "wrong-size",
    "wrong-dtype",
    "non-finite",
    "bad-weight",
    "buffer-full",
    "second-update",
    "round-closed",
    "stale-round",
]
AggregationReason = Literal[
    "empty-round", "too-few-updates", "wrong-size", "wrong-state", "round-spent"
]
LedgerReason = Literal["ledger-corrupt", "ledger-io", "duplicate-release"]
TrainerReason = Literal[
    "bad-round-policy",
    "checkpoint-corrupt",
    "export-child",
    "no-open-round",
    "not-secure",
    "unknown-strategy",
    "bad-strategy-option",
    "privacy-budget-exhausted",
    "bad-rebase",
    UpdateRejectedReason,
    AggregationReason,
    LedgerReason,
]


class TrainerError(ReasonedError[TrainerReason]):
    """Base of every error the trainer raises on purpose.

    ``reason`` is a short kebab-case cause (:data:`TrainerReason`, which holds the
    subclasses' reasons too); ``detail`` says what was wrong, in words.
    """


class UnknownStrategyError(TrainerError):
    """The settings name an aggregation strategy that does not exist.

    ``name`` is what was asked for, ``known`` the names that exist.
    """

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            "unknown-strategy", f"no strategy named {name!r}; known: {', '.join(known)}"
        )


class StrategyConfigError(TrainerError):
    """A strategy option is unknown or out of range. ``option`` names it."""

    def __init__(self, strategy: str, option: str, detail: str) -> None:
        self.strategy = strategy
        self.option = option
        super().__init__("bad-strategy-option", f"{strategy}: {option}: {detail}")


class UpdateRejected(TrainerError):
    """One update cannot be folded into the round; the round state is unchanged.

    ``reason`` is one of ``wrong-size``, ``wrong-dtype``, ``non-finite``, ``bad-weight``,
    ``buffer-full``, ``second-update``, ``round-closed`` (it came while its round was
    being closed), ``stale-round`` (its base is no longer one the rounds take: they were
    rebased meanwhile, :mod:`trainer.serving_watch`).
    """

    reason: UpdateRejectedReason

    def __init__(self, reason: UpdateRejectedReason, detail: str) -> None:
        super().__init__(reason, detail)


class AggregationError(TrainerError):
    """A round cannot be finalised (``empty-round``, ``too-few-updates``, ``wrong-state``,
    ``wrong-size``)."""

    reason: AggregationReason

    def __init__(self, reason: AggregationReason, detail: str) -> None:
        super().__init__(reason, detail)


class PrivacyBudgetExceeded(TrainerError):
    """A differentially private release would spend more than the model's budget.

    Nothing was recorded or released. ``spent`` is the epsilon already spent,
    ``would_be`` the epsilon after the refused release, ``budget`` the limit, all at
    ``delta``.
    """

    def __init__(
        self, model: str, spent: float, would_be: float, budget: float, delta: float
    ) -> None:
        self.model = model
        self.spent = spent
        self.would_be = would_be
        self.budget = budget
        self.delta = delta
        super().__init__(
            "privacy-budget-exhausted",
            f"model {model!r}: epsilon would reach {would_be:.4g} > budget {budget:.4g} "
            f"(spent {spent:.4g}, delta {delta:.3g})",
        )


class LedgerError(TrainerError):
    """The privacy ledger cannot be read, written or trusted.

    ``reason`` is one of ``ledger-corrupt``, ``ledger-io``, ``duplicate-release``.
    A corrupt ledger is never reset silently: that would forget spent privacy.
    """

    reason: LedgerReason

    def __init__(self, reason: LedgerReason, detail: str) -> None:
        super().__init__(reason, detail)
