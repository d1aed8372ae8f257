"""``python -m gateway``: serve the gateway with uvicorn from ``FEDGATE_GATEWAY_*`` settings."""

from __future__ import annotations

import sys

import uvicorn

from fedcore.logs import configure_logging
from gateway.app import create_app
from gateway.settings import GatewaySettings


def main() -> int:
    settings = GatewaySettings()  # type: ignore[call-arg]  # fields come from the environment
    configure_logging("gateway", settings.log_level, settings.log_json)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
