"""``python -m gateway``: serve the gateway with uvicorn from ``FEDGATE_GATEWAY_*`` settings.

One uvicorn worker (uvloop, httptools): the rate limits, the outstanding-request counts
that routing uses and the ejection state live in the process. Measured on 2 cores shared
with Triton, a second worker did not add throughput (see benchmarks/gateway_overhead.py).
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from fedcore.errors import ConfigError
from fedcore.logs import configure_logging
from fedcore.settings import load_settings
from gateway.app import create_app
from gateway.fastpath import protocol_class
from gateway.settings import GatewaySettings


def main() -> int:
    settings = load_settings(GatewaySettings, "gateway")
    if settings is None:
        return 2
    configure_logging("gateway", settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        logging.getLogger("gateway").error("gateway not started: %s", exc)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(app.plane, settings.max_body_bytes),
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
