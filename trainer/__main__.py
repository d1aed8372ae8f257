"""``python -m trainer [bootstrap|serve]`` from ``FEDGATE_TRAINER_*`` settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from fedcore.errors import FedgateError
from fedcore.logs import configure_logging
from fedcore.settings import load_settings
from trainer.service import bootstrap, serve
from trainer.settings import TrainerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    parser.add_argument("command", choices=["bootstrap", "serve"], nargs="?", default="serve")
    args = parser.parse_args(argv)
    settings = load_settings(TrainerSettings, "trainer")
    if settings is None:
        return 2
    configure_logging("trainer", settings.log_level, settings.log_json)
    try:
        if args.command == "bootstrap":
            bootstrap(settings)
        else:
            asyncio.run(serve(settings))
    except FedgateError as exc:
        logging.getLogger("trainer").error("trainer stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
