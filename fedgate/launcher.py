"""The local launcher: the whole stack on one machine, each service its own process.

Order of start: nats-server, trainer bootstrap (signed version 1), trainer, edges (each
with its own tritonserver), gateway. Stop runs in reverse, each with a deadline, and
leaves no process behind. While it runs, :meth:`Stack.check` (stepped by ``fedgate up``,
or :meth:`Stack.supervise` / :func:`supervised`) restarts a service that exits, with
backoff, and gives up on one that keeps failing (:mod:`fedgate.restarts`); restarts are
in ``<data-dir>/launcher-status.json`` for ``fedgate status``. Secrets and keys are
created under the data directory on first start (development convenience; production
mounts them, see the README). With ``StackConfig.tls`` every service talks to NATS over
mutual TLS with its own client certificate (:mod:`fedgate.stack_tls`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedcore.errors import ProcessError
from fedcore.keys import read_secret, write_secret
from fedcore.models import MODEL_VARS
from fedcore.process import ManagedProcess, free_port
from fedgate.keys_cmd import KeyLayout, hpke_kem, init_keys
from fedgate.nats_accounts import role_permissions
from fedgate.natsconf import clustered, render_nats_config, write_nats_config
from fedgate.restarts import STATUS_FILE, ProcessSupervisor, RestartPolicy
from fedgate.stack_tls import StackTls, ensure_stack_tls
from gateway.auth import generate_key, key_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    """What ``fedgate up`` was asked for."""

    data_dir: Path
    edges: int = 2
    port: int = 8080
    host: str = "127.0.0.1"
    nats_port: int = 0  # 0: pick a free port
    nats_cluster: int = 1
    """nats-server processes: 1, or a JetStream cluster of 3 or 5 with routes (replicas 3)."""
    gateways: int = 1
    """Gateway replicas, on ``port``, ``port + 1``, ...; one of them moves rollouts on."""
    log_level: str = "INFO"
    ready_timeout_s: float = 180.0
    tls: bool = False
    """mTLS between the services and NATS, certificates in ``<data_dir>/tls``."""
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra settings by env prefix, e.g. ``{"FEDGATE_TRAINER_": {"MIN_UPDATES": "3"}}``."""
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    """How exited services are restarted, and when the stack gives up (a crash loop)."""
    models: tuple[str, ...] = ("digits",)
    """The names of the models served (their references travel in ``overrides``' MODELS)."""


@dataclass
class EdgePorts:
    http: int
    grpc: int
    metrics: int  # Triton's
    runtime_metrics: int = 0  # the edge runtime's own (fedgate_edge_*)


@dataclass
class Stack:
    """The processes of one local stack."""

    config: StackConfig
    processes: list[ManagedProcess] = field(default_factory=list)
    nats_url: str = ""
    edge_ports: dict[str, EdgePorts] = field(default_factory=dict)
    trainer_metrics_port: int = 0
    tls: StackTls | None = None
    """The certificates, when ``config.tls``; set by :meth:`start`. NATS clients of the
    stack's own (tools, tests) connect with ``tls.client_context(user)``."""
    supervisor: ProcessSupervisor | None = None
    _stopped: bool = False

    def __post_init__(self) -> None:
        self.supervisor = ProcessSupervisor(
            self.config.data_dir / STATUS_FILE, self.config.restarts, extra=self._status_extra
        )

    def _status_extra(self) -> dict[str, Any]:
        return {"gateway_url": self.gateway_url, "metrics": self.metrics_urls()}

    @property
    def gateway_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def gateway_urls(self) -> list[str]:
        """Every gateway replica's URL (the first is :attr:`gateway_url`)."""
        host, port = self.config.host, self.config.port
        return [f"http://{host}:{port + i}" for i in range(self.config.gateways)]

    def metrics_urls(self) -> dict[str, str]:
        """Prometheus endpoints: the gateway's (needs an API key), the trainer's, each edge
        runtime's and each edge's Triton."""
        host = self.config.host
        urls = {"gateway": f"{self.gateway_url}/metrics"}
        for i, url in enumerate(self.gateway_urls[1:], start=2):
            urls[f"gateway-{i}"] = f"{url}/metrics"
        urls["trainer"] = f"http://{host}:{self.trainer_metrics_port}/metrics"
        for edge_id, ports in self.edge_ports.items():
            urls[edge_id] = f"http://{host}:{ports.runtime_metrics}/metrics"
            urls[f"{edge_id} triton"] = f"http://{host}:{ports.metrics}/metrics"
        return urls

    @property
    def edge_ids(self) -> list[str]:
        return [f"edge-{i + 1}" for i in range(self.config.edges)]

    # -- secrets ---------------------------------------------------------------------
    def _secret(self, name: str) -> Path:
        path = self.config.data_dir / "secrets" / name
        if not path.exists():
            write_secret(path, secrets.token_urlsafe(24))
        return path

    @property
    def admin_key_file(self) -> Path:
        """The gateway API key with role ``admin`` (``Authorization: Bearer <key>``)."""
        return self.config.data_dir / "secrets" / "gateway-admin.key"

    @property
    def infer_key_file(self) -> Path:
        """The gateway API key with role ``infer``."""
        return self.config.data_dir / "secrets" / "gateway-infer.key"

    def api_key(self, role: str = "infer") -> str:
        """The key of ``role`` (created with the stack), for clients of the gateway."""
        return read_secret(self.admin_key_file if role == "admin" else self.infer_key_file)

    def _gateway_keys(self) -> Path:
        """Create an admin and an infer key on first start; the gateway gets their hashes."""
        for path in (self.admin_key_file, self.infer_key_file):
            if not path.exists():
                write_secret(path, generate_key())
        hashed = self.config.data_dir / "secrets" / "gateway-api-keys"
        lines = [
            key_line("admin", "local-admin", read_secret(self.admin_key_file)),
            key_line("infer", "local-infer", read_secret(self.infer_key_file)),
        ]
        write_secret(hashed, "\n".join(lines))
        return hashed

    def _keys(self) -> KeyLayout:
        """Trainer keys, edge identities and the edge registry (``fedgate keys init``)."""
        return init_keys(self.config.data_dir / "keys", self.edge_ids)

    def _signing_key(self) -> Path:
        return self._keys().signing_key

    def _service_env(self, prefix: str, user: str, extra: dict[str, str]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("FEDGATE_") or k in MODEL_VARS  # a model's own, for all
        }
        env["PYTHONUNBUFFERED"] = "1"
        settings = {
            "NATS_URL": self.nats_url,
            "NATS_USER": user,
            "NATS_PASSWORD_FILE": str(self._secret(f"nats-{user}.pass")),
            "LOG_LEVEL": self.config.log_level,
        }
        if self.tls is not None:
            settings |= self.tls.client_settings(user)  # its own client certificate
        for key, value in (settings | extra | self.config.overrides.get(prefix, {})).items():
            env[f"{prefix}{key}"] = value
        return env

    # -- processes -------------------------------------------------------------------
    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], ports: dict[str, int]
    ) -> ManagedProcess:
        proc = ManagedProcess(
            name, argv, log_path=self.config.data_dir / "logs" / f"{name}.log", env=env, ports=ports
        )
        proc.start()
        self.processes.append(proc)
        if self.supervisor is not None:
            self.supervisor.add(proc)
        return proc

    def _start_nats(self) -> None:
        cfg = self.config
        n = cfg.nats_cluster
        ports = [cfg.nats_port or free_port(), *(free_port() for _ in range(n - 1))]
        monitors = [free_port() for _ in range(n)]
        routes = [free_port() for _ in range(n)] if n > 1 else []
        users = {
            u: _read(self._secret(f"nats-{u}.pass")) for u in ["trainer", "gateway", *self.edge_ids]
        }
        binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
        started = []
        for i in range(n):
            home = cfg.data_dir / "nats" / (f"n{i + 1}" if i else "")
            text = render_nats_config(
                host=cfg.host,
                port=ports[i],
                monitor_port=monitors[i],
                store_dir=home / "jetstream",
                users=users,
                permissions={u: role_permissions(u) for u in users},  # least privilege
                tls=self.tls.nats_server() if self.tls is not None else None,
            )
            if n > 1:
                peers = [r for r in routes if r != routes[i]]
                text = clustered(text, f"fedgate_n{i + 1}", cfg.host, routes[i], peers)
            write_nats_config(home / "nats.conf", text)
            name = f"nats-server-{i + 1}" if i else "nats-server"
            argv = [binary, "-c", str(home / "nats.conf")]
            ports_of = {"client": ports[i], "monitor": monitors[i]}
            started.append(self._spawn(name, argv, dict(os.environ), ports_of))
        # a cluster serves JetStream once it has a meta leader: full health, not js-enabled
        health = "/healthz" if n > 1 else "/healthz?js-enabled-only=true"
        for proc, monitor in zip(started, monitors, strict=True):
            proc.wait_ready(functools.partial(_http_ok, f"http://{cfg.host}:{monitor}{health}"), 60)
        scheme = "tls" if self.tls is not None else "nats"
        self.nats_url = ",".join(f"{scheme}://{cfg.host}:{p}" for p in ports)

    @property
    def nats_replicas(self) -> int:
        """Replicas of every stream, bucket and object store: 3 on a cluster, else 1."""
        return 3 if self.config.nats_cluster >= 3 else 1

    def _bootstrap_trainer(self, env: dict[str, str]) -> None:
        log.info("preparing version 1 of the models (first start trains briefly)")
        log_path = self.config.data_dir / "logs" / "trainer-bootstrap.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            result = subprocess.run(
                [sys.executable, "-m", "trainer", "bootstrap"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=600,
                check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise ProcessError(
                "trainer bootstrap", "exited", f"exit code {result.returncode}:\n{tail}"
            )

    def _start_trainer(self) -> None:
        d = self.config.data_dir / "trainer"
        keys = self._keys()
        self.trainer_metrics_port = free_port()
        env = self._service_env(
            "FEDGATE_TRAINER_",
            "trainer",
            {
                "DATA_DIR": str(d),
                "SIGNING_KEY_FILE": str(keys.signing_key),
                "HPKE_PRIVATE_KEY_FILE": str(keys.hpke_key),
                "HPKE_KEM": hpke_kem(keys),  # the key's own (fedgate keys init --kem)
                "EDGE_REGISTRY_FILE": str(keys.registry),
                "METRICS_HOST": self.config.host,
                "METRICS_PORT": str(self.trainer_metrics_port),
                # each released version is rolled out through the gateway (admin key)
                "GATEWAY_URL": self.gateway_url,
                "ADMIN_KEY_FILE": str(self.admin_key_file),
                "NATS_REPLICAS": str(self.nats_replicas),
            },
        )
        self._gateway_keys()  # the admin key exists before the trainer may need it
        self._bootstrap_trainer(env)
        self._spawn("trainer", [sys.executable, "-m", "trainer", "serve"], env, {})

    def _start_edge(self, edge_id: str) -> ManagedProcess:
        ports = EdgePorts(free_port(), free_port(), free_port(), free_port())
        self.edge_ports[edge_id] = ports
        d = self.config.data_dir / "edges" / edge_id
        keys = KeyLayout(self.config.data_dir / "keys")
        env = self._service_env(
            "FEDGATE_EDGE_",
            edge_id,
            {
                "EDGE_ID": edge_id,
                "DATA_DIR": str(d),
                "SEED_ARTIFACTS_DIR": str(self.config.data_dir / "trainer" / "artifacts"),
                "TRAINER_PUBLIC_KEY_FILE": str(
                    self.config.data_dir / "keys" / "trainer-signing.pub"
                ),
                "IDENTITY_KEY_FILE": str(keys.edge_key(edge_id)),
                "TRAINER_HPKE_PUBLIC_KEY_FILE": str(keys.hpke_pub),
                # peers' keys for secure rounds (used only when SECAGG is set)
                "SECAGG_REGISTRY_FILE": str(keys.registry),
                "TRITON_CONTROL_SECRET_FILE": str(self._secret(f"triton-control-{edge_id}")),
                "TRITON_HOST": self.config.host,
                "TRITON_HTTP_PORT": str(ports.http),
                "TRITON_GRPC_PORT": str(ports.grpc),
                "TRITON_METRICS_PORT": str(ports.metrics),
                "READY_TIMEOUT_S": str(self.config.ready_timeout_s),
                "METRICS_HOST": self.config.host,
                "METRICS_PORT": str(ports.runtime_metrics),
            },
        )
        return self._spawn(edge_id, [sys.executable, "-m", "edge_runtime"], env, {})

    def _start_gateway(self, index: int = 0) -> ManagedProcess:
        name = f"gateway-{index + 1}" if index else "gateway"
        extra = {
            "HOST": self.config.host,
            "PORT": str(self.config.port + index),
            "API_KEYS_FILE": str(self._gateway_keys()),
            # one secret for every replica: a token minted by one is honoured by all
            "FEEDBACK_SECRET_FILE": str(self._secret("gateway-feedback")),
            "NATS_REPLICAS": str(self.nats_replicas),
            "INSTANCE_ID": f"gateway-{index + 1}",
        }
        env = self._service_env("FEDGATE_GATEWAY_", "gateway", extra)
        return self._spawn(
            name, [sys.executable, "-m", "gateway"], env, {"http": self.config.port + index}
        )

    @property
    def start_steps(self) -> int:
        """How many times :meth:`start` reports a step: NATS, version 1, the edges'
        Tritons one by one, each gateway seeing every edge, then ``ready``."""
        return 3 + self.config.edges + self.config.gateways

    def start(self, step: Callable[[str], None] | None = None) -> None:
        """Start everything and wait until the gateway routes to every edge. ``step``
        hears what is waited for next (a progress display), :attr:`start_steps` times."""
        say = step or (lambda _what: None)
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._signing_key()
        if self.config.tls:
            self.tls = ensure_stack_tls(
                self.config.data_dir / "tls",
                ["trainer", "gateway", *self.edge_ids],
                hosts=[self.config.host],
            )
        say("nats-server healthy")
        self._start_nats()
        say("version 1 of the models (the first start trains it)")
        self._start_trainer()
        edges = [self._start_edge(e) for e in self.edge_ids]
        gateways = [self._start_gateway(i) for i in range(self.config.gateways)]
        deadline = time.monotonic() + self.config.ready_timeout_s
        for proc in edges:
            say(f"{proc.name}: its Triton ready")
            proc.wait_ready(self._edge_probe(proc.name), max(1.0, deadline - time.monotonic()))
        for url, proc in zip(self.gateway_urls, gateways, strict=True):
            say(f"{proc.name} routing to every edge")
            sees_all = functools.partial(self._gateway_sees_all, url)
            proc.wait_ready(sees_all, max(1.0, deadline - time.monotonic()))
        say("ready")

    def _edge_probe(self, edge_id: str) -> Callable[[], bool]:
        url = f"http://{self.config.host}:{self.edge_ports[edge_id].http}/v2/health/ready"
        return lambda: _http_ok(url)

    def _gateway_sees_all(self, url: str) -> bool:
        auth = {"Authorization": f"Bearer {self.api_key()}"}
        req = urllib.request.Request(url + "/v1/edges", headers=auth)  # noqa: S310
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310
            edges = json.loads(resp.read())["edges"]
        return len(edges) == self.config.edges and all(
            any(m["ready"] for m in e["models"].values()) for e in edges
        )

    def check(self) -> None:
        """Restart services that exited (when due); raises :class:`fedgate.restarts.CrashLoop`
        for one that keeps failing. Non-blocking; call it from the thread that started the
        stack (or one that outlives the processes: their death signal follows it)."""
        if not self._stopped and self.supervisor is not None:
            self.supervisor.check()

    def supervise(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        """:meth:`check` until ``stop`` is set (or a crash loop raises)."""
        while not stop.wait(interval_s):
            self.check()

    def restarts(self) -> dict[str, int]:
        """Restarts so far, per process name."""
        return self.supervisor.restarts() if self.supervisor is not None else {}

    def stop(self) -> None:
        """Stop in reverse start order, each with a deadline. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.supervisor is not None:
            self.supervisor.mark_stopped()
        for proc in reversed(self.processes):
            timeout = 30.0 if proc.name.startswith("edge-") else 15.0
            try:
                proc.stop(timeout=timeout)
            except ProcessError as exc:
                log.error("%s", exc)
        log.info("stack stopped")


T = TypeVar("T")


async def supervised(stack: Stack, work: Coroutine[Any, Any, T], interval_s: float = 0.5) -> T:
    """Run ``work`` while checking the stack's processes from this (the loop's) thread;
    a crash loop cancels ``work`` and raises :class:`fedgate.restarts.CrashLoop`."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=interval_s)
            stack.check()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result()


def _read(path: Path) -> str:
    return path.read_text().strip()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback probe
            return int(resp.status) == 200
    except (OSError, ValueError):
        return False
