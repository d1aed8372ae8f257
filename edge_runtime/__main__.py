"""``python -m edge_runtime``: run one edge from ``FEDGATE_EDGE_*`` settings."""

from __future__ import annotations

import asyncio
import logging
import sys

from edge_runtime.service import serve
from edge_runtime.settings import EdgeSettings
from fedcore.errors import FedgateError
from fedcore.logs import configure_logging
from fedcore.settings import load_settings


def main() -> int:
    settings = load_settings(EdgeSettings, "edge")
    if settings is None:
        return 2
    configure_logging(f"edge:{settings.edge_id}", settings.log_level, settings.log_json)
    try:
        asyncio.run(serve(settings))
    except FedgateError as exc:
        logging.getLogger("edge_runtime").error("edge stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
