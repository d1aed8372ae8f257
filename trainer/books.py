"""The round books of the trainer's models, built from its settings.

Per model: the round policy (:func:`policy_of`), the strategy (:func:`build_strategy`,
with the privacy ledger for ``dp_fedavg``), and the book itself (:func:`build_book`):
from its checkpoint, else from the newest signed version, with the digest of every
released version (the bases an asynchronous round may take updates from).
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.artifact import read_signed_manifest
from fedcore.errors import ArtifactError, ConfigError
from fedcore.params import load_signed_weights
from fedcore.wire import ClientRecipe
from trainer import checkpoint
from trainer.bounds import UpdateBounds
from trainer.release import version_digest
from trainer.rounds import RoundBook, RoundPolicy
from trainer.settings import TrainerSettings
from trainer.strategies import get_strategy
from trainer.strategies.accountant import PrivacyLedger
from trainer.strategies.base import Strategy

log = logging.getLogger(__name__)


def bounds_of(settings: TrainerSettings) -> UpdateBounds:
    """The per-update bounds of the settings; ``dp_fedavg`` keeps only the absolute ones
    (its sensitivity bound needs each edge's part independent of the others')."""
    dp = settings.strategy.strip().lower().replace("-", "_") == "dp_fedavg"
    return UpdateBounds(
        max_samples=settings.max_samples_per_update,
        sample_ratio=None if dp else settings.sample_weight_ratio,
        norm_ratio=None if dp else settings.update_norm_ratio,
        clip_norm=settings.update_clip_norm,
        warmup=settings.bounds_warmup,
    )


def policy_of(settings: TrainerSettings) -> RoundPolicy:
    return RoundPolicy(
        bounds=bounds_of(settings),
        mode=settings.round_mode,
        min_updates=settings.min_updates,
        deadline_s=settings.round_deadline_s,
        sample_fraction=settings.sample_fraction,
        buffer_size=settings.buffer_size,
        max_staleness=settings.max_staleness,
        staleness_exponent=settings.staleness_exponent,
        step_backoff=settings.step_backoff,
        recipe=ClientRecipe(**settings.recipe_overrides()),
    )


def released_versions(settings: TrainerSettings, model: str) -> list[int]:
    root = settings.artifacts_dir / model
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "manifest.json").exists()
    )


def build_strategy(settings: TrainerSettings, model: str) -> Strategy:
    """The configured strategy; ``dp_fedavg`` gets the per-model privacy ledger."""
    options: dict[str, Any] = dict(settings.strategy_options)
    if settings.strategy.strip().lower().replace("-", "_") == "dp_fedavg":
        if settings.dp_epsilon_budget is None:
            raise ConfigError("dp_fedavg needs FEDGATE_TRAINER_DP_EPSILON_BUDGET (total epsilon)")
        ledger_path = settings.state_dir / "privacy-ledger.json"
        options |= {
            "ledger": PrivacyLedger(ledger_path, settings.dp_epsilon_budget, settings.dp_delta),
            "model": model,
        }
    strategy = get_strategy(settings.strategy, **options)
    check_quorum(settings, strategy)
    return strategy


def check_quorum(settings: TrainerSettings, strategy: Strategy) -> None:
    """Refuse a round size below what the strategy needs (Krum: ``2f + 3`` updates), so a
    round never closes with too few updates to aggregate (an async buffer closes with
    ``BUFFER_SIZE``, or at its timeout with ``MIN_UPDATES``)."""
    needed = int(getattr(strategy, "min_round_updates", 1))
    sizes = [("MIN_UPDATES", settings.min_updates)]
    if settings.round_mode == "async":
        sizes.insert(0, ("BUFFER_SIZE", settings.buffer_size))
    for name, quorum in sizes:
        if quorum < needed:
            raise ConfigError(
                f"strategy {strategy.name} {strategy.options()} needs {needed} updates per "
                f"round; FEDGATE_TRAINER_{name} is {quorum}"
            )


def build_book(
    settings: TrainerSettings, model: str, trusted: ed25519.Ed25519PublicKey
) -> RoundBook:
    """The model's round book: from its checkpoint, else from its newest version.

    The newest version is verified against ``trusted`` (the trainer's own key) and its
    weights mapped from the descriptor they were hashed from; a version that does not
    verify stops the trainer. Older versions count as async bases by the digest their
    signed manifest lists (one that does not verify is left out, with a warning)."""
    strategy = build_strategy(settings, model)
    versions = released_versions(settings, model)
    newest = versions[-1]
    history = _older_digests(settings, model, trusted, versions[:-1])
    directory = settings.artifacts_dir / model / str(newest)
    try:  # the ONNX file was checked in the export child that wrote it
        manifest, params = load_signed_weights(
            directory, trusted, model=model, version=newest, check_onnx=False
        )
        history[newest] = version_digest(manifest)
    except ArtifactError as exc:
        raise ArtifactError(
            exc.reason,
            f"{model} version {newest} ({directory}) does not verify, the trainer does not "
            f"start from it: {exc.detail}",
        ) from None
    book = RoundBook(
        model,
        policy_of(settings),
        strategy,
        version=newest,
        digest=history[newest],
        params=params,  # mapped: read when used, not kept resident
        seed=settings.seed,
        history=history,
    )
    restored = checkpoint.load(settings.state_dir / "checkpoints" / model)
    if restored is not None and restored.version <= newest:
        checkpoint.resume(book, restored)
        log.info("resumed from checkpoint", extra={"model": model, "round": book.next_round - 1})
    return book


def _older_digests(
    settings: TrainerSettings, model: str, trusted: ed25519.Ed25519PublicKey, versions: list[int]
) -> dict[int, str]:
    """The digests of ``versions`` from their signed manifests (unverified ones left out)."""
    out: dict[int, str] = {}
    for v in versions:
        directory = settings.artifacts_dir / model / str(v)
        try:
            manifest = read_signed_manifest(directory, trusted, model=model, version=v)
            out[v] = version_digest(manifest)
        except ArtifactError as exc:
            log.warning("version %d of %s is no async base: %s", v, model, exc)
    return out
