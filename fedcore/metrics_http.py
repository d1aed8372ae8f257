"""Prometheus exposition over HTTP for services without an HTTP server of their own.

The trainer and the edge runtime serve their registry on ``metrics_port`` (settings; off
when unset) from prometheus_client's WSGI server in a daemon thread. The gateway needs
none of this: it serves ``/metrics`` on its own port.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


@dataclass
class MetricsServer:
    """A running exposition server; :meth:`close` stops it (idempotent)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self, timeout_s: float = 5.0) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout_s)
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: any free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
