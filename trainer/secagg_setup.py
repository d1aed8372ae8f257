"""Start-time checks of the trainer's secure-aggregation settings.

Secure aggregation hands the trainer only the sum of a round's updates, so every setting
that needs them one by one is refused before the trainer does anything else, with a
:class:`ConfigError` that says why (the service then exits non-zero with that message):
robust strategies (median, trimmed mean, Krum), trainer-side clipping of individual updates
(strategy ``clipping``) and buffered asynchronous rounds. A model too large for one NATS
message is fine: masked inputs travel in parts (:mod:`fedcore.secagg.parts`).
``dp_fedavg`` is accepted: the edges clip (``secagg clip_norm``) instead of the trainer and
the noise goes on the sum (:meth:`DPFedAvg.noise_std_for`).
"""

from __future__ import annotations

from fedcore.errors import ConfigError
from fedcore.secagg import SecAggConfig, check_compatible
from fedcore.secagg.config import normalise_strategy
from trainer.settings import TrainerSettings


def check_strategy(strategy: str) -> None:
    """Refuse a strategy secure aggregation cannot run (``ConfigError``)."""
    name = normalise_strategy(strategy)
    if name == "clipping":  # clips each update on the trainer: impossible on a sum
        check_compatible("fedavg", trainer_clip=True)
    elif name == "dp_fedavg":  # its per-update clip moves to the edges; noise on the sum
        check_compatible("fedavg", trainer_clip=False)
    else:
        check_compatible(strategy, trainer_clip=False)


def secagg_configs(settings: TrainerSettings) -> dict[str, SecAggConfig]:
    """The secure-aggregation settings of each model that has them; ``ConfigError`` for a
    combination secure aggregation cannot honour."""
    configs: dict[str, SecAggConfig] = {}
    for model, options in settings.secagg.items():
        if model not in settings.models:
            raise ConfigError(
                f"secagg is set for model {model!r}, which this trainer does not serve "
                f"(models: {', '.join(settings.models)})"
            )
        if settings.round_mode != "sync":
            raise ConfigError(
                f"secure aggregation (secagg for {model!r}) cannot be combined with "
                f"round_mode {settings.round_mode!r}: buffered asynchronous rounds weigh and "
                "fold each update on its own; use round_mode 'sync'"
            )
        check_strategy(settings.strategy)
        configs[model] = options.config()
    return configs
