"""The edge's own tritonserver, supervised: the binary bundled in ``nvidia-pytriton``, or
a Triton installation (``triton_home``, e.g. ``/opt/tritonserver`` in the official image).

Explicit model-control mode. Every API but inference, health and metadata (what the
gateway needs) is restricted by a secret header only this runtime knows: the model
repository and model configuration (dynamic loading runs model code), system and CUDA
shared memory, trace, logging and statistics (:data:`RESTRICTED_APIS`), on HTTP and gRPC
alike. Ports bind to the edge's private address. Triton's metrics port (read by the idle
detector) is a separate listener, not one of these APIs.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgeError, ModelLoadError
from fedcore.process import ManagedProcess, cmdline, group_members, kill_group

log = logging.getLogger(__name__)

CONTROL_HEADER = "fedgate-control-key"
RESTRICTED_APIS = (
    "model-repository",
    "model-config",
    "shared-memory",
    "statistics",
    "trace",
    "logging",
)
"""Triton 2.51's API categories behind :data:`CONTROL_HEADER` (``--help`` lists them)."""
CONTROL_TIMEOUT_S = 120.0
"""Loading a model may take long; probes and the index use their own, short timeouts."""
TritonFailure = (OSError, ValueError, http.client.HTTPException)
"""What a call to a dead, dying or hung Triton raises (refused, reset, timed out, garbled)."""
SHM_DIR = Path("/dev/shm")  # noqa: S108 - where POSIX shared memory objects live, not a temp file
_SHM_REGION = re.compile(r"\btriton_python_backend_shm_region_[0-9A-Za-z-]+")


@dataclass(frozen=True)
class TritonDist:
    """Where the bundled Triton lives inside the nvidia-pytriton wheel."""

    root: Path

    @classmethod
    def find(cls) -> TritonDist:
        try:
            import pytriton
        except ImportError:
            raise TritonMissingError() from None
        return cls(Path(pytriton.__file__).parent / "tritonserver")

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def prepare_backends(dist: TritonDist, target: Path) -> Path:
    """Copy the python backend with the stub for this Python into ``target`` (once)."""
    python_dir = target / "python"
    if not (python_dir / "triton_python_backend_stub").exists():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(dist.root / "backends", target)
        shutil.copy2(dist.stub(), python_dir / "triton_python_backend_stub")
    return target


class TritonMissingError(EdgeError):
    """No tritonserver: ``triton_home`` is unset and the nvidia-pytriton wheel is absent."""

    def __init__(self) -> None:
        super().__init__(
            "no tritonserver: FEDGATE_EDGE_TRITON_HOME is unset and nvidia-pytriton is not "
            "installed (the local stack's binaries: pip install 'fedgate[local]'; in the "
            "official Triton image set FEDGATE_EDGE_TRITON_HOME=/opt/tritonserver)"
        )


class TritonHomeError(EdgeError):
    """``triton_home`` does not hold a Triton installation."""

    def __init__(self, home: Path, missing: Path, what: str) -> None:
        self.home = home
        self.missing = missing
        super().__init__(
            f"FEDGATE_EDGE_TRITON_HOME={home} is not a Triton installation: {missing} {what} "
            "(expected <home>/bin/tritonserver and <home>/backends, as in /opt/tritonserver "
            "of the official image; unset it to use the tritonserver of nvidia-pytriton)"
        )


@dataclass(frozen=True)
class TritonLaunch:
    """What to run: the tritonserver binary, its backend directory, its environment."""

    binary: Path
    backends: Path
    env: dict[str, str]


def resolve_triton(
    home: Path | None, work_dir: Path, environ: Mapping[str, str] | None = None
) -> TritonLaunch:
    """The binary, backends and environment of tritonserver.

    ``home`` set: ``<home>/bin/tritonserver`` with ``<home>/backends`` as they are (an
    installation brings its own python-backend stub and library path). ``home`` None: the
    wheel's binary, its backends copied into ``work_dir/backends`` with the stub for this
    Python, and the wheel's libraries on ``LD_LIBRARY_PATH``. Either way this
    interpreter's directory leads ``PATH``: the python-backend stub runs models with the
    environment of the first ``python3`` on it (this runtime's, with onnxruntime).
    """
    env = dict(os.environ if environ is None else environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    if home is not None:
        binary, backends = home / "bin" / "tritonserver", home / "backends"
        if not binary.is_file():
            raise TritonHomeError(home, binary, "does not exist")
        if not os.access(binary, os.X_OK):
            raise TritonHomeError(home, binary, "is not executable")
        if not backends.is_dir():
            raise TritonHomeError(home, backends, "is not a directory")
        return TritonLaunch(binary, backends, env)
    dist = TritonDist.find()
    backends = prepare_backends(dist, work_dir / "backends")
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return TritonLaunch(dist.binary, backends, env)


class TritonServer:
    """Start, probe, control and stop one tritonserver."""

    def __init__(
        self,
        *,
        name: str,
        repository: Path,
        work_dir: Path,
        host: str,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        control_secret: str,
        exit_timeout_s: int = 10,
        triton_home: Path | None = None,
    ) -> None:
        self.host = host
        self.http_port = http_port
        self.control_secret = control_secret
        self.exit_timeout_s = exit_timeout_s
        launch = resolve_triton(triton_home, work_dir)
        restricted = ",".join(RESTRICTED_APIS)
        argv = [
            str(launch.binary),
            f"--model-repository={repository}",
            f"--backend-directory={launch.backends}",
            "--model-control-mode=explicit",
            f"--http-restricted-api={restricted}:{CONTROL_HEADER}={control_secret}",
            f"--grpc-restricted-protocol={restricted}:{CONTROL_HEADER}={control_secret}",
            f"--http-address={host}",
            f"--http-port={http_port}",
            # the gateway's x-fedgate-key (the key that made a request) reaches model.py as a
            # request parameter: captured ids are bound to the key
            "--http-header-forward-pattern=^x-fedgate-key$",
            f"--grpc-address={host}",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={metrics_port}",
            f"--exit-timeout-secs={exit_timeout_s}",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.process = ManagedProcess(
            name,
            argv,
            log_path=work_dir / "tritonserver.log",
            env=launch.env,
            cwd=work_dir,
            ports=ports,
            pid_file=work_dir / "tritonserver.pid",
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        control: bool = False,
        timeout: float = CONTROL_TIMEOUT_S,
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if control:
            headers[CONTROL_HEADER] = self.control_secret
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)  # noqa: S310 - our own loopback URL
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            return int(err.code), bytes(err.read())

    def live(self, timeout: float = 2.0) -> bool:
        """``/v2/health/live`` answered 200 within ``timeout``; raises on no answer."""
        return self._request("GET", "/v2/health/live", timeout=timeout)[0] == 200

    def start(self, timeout: float) -> None:
        """Start and wait until the server answers ``/v2/health/live``.

        A tritonserver left by a previous run of this edge (its runtime was killed; the
        server got the death signal but may still be draining) is killed with its
        python-backend stub first, so the new one gets the ports.
        """
        self.clear_previous()
        self.process.start()
        self.process.wait_ready(self.live, timeout)

    def clear_previous(self) -> None:
        """Kill what a previous run of this edge left of its tritonserver."""
        pgid = self.process.previous_group()
        if pgid is None:
            return
        members = group_members(pgid)
        log.warning("killing the tritonserver of a previous run", extra={"pids": members})
        regions = _shm_regions(members)
        kill_group(pgid)
        _unlink_regions(regions)

    def kill(self) -> int | None:
        """SIGKILL Triton and its python-backend stubs now (dead or hung: no drain) and
        remove the stubs' shared-memory regions, which a killed server leaves behind.
        Returns the server's exit code (negative: the signal that ended it)."""
        regions = _shm_regions(self.process.members())
        code = self.process.kill()
        _unlink_regions(regions)
        return code

    def load(self, model: str) -> None:
        """Load (or reload) ``model`` through the repository API; raise with Triton's reason."""
        status, body = self._request("POST", f"/v2/repository/models/{model}/load", b"{}", True)
        if status != 200:
            raise ModelLoadError(model, None, _error_text(body))

    def unload(self, model: str) -> None:
        status, body = self._request("POST", f"/v2/repository/models/{model}/unload", b"{}", True)
        if status != 200:
            raise ModelLoadError(model, None, "unload failed: " + _error_text(body))

    def index(self, timeout: float = CONTROL_TIMEOUT_S) -> list[dict[str, Any]]:
        """Triton's repository index: name, version, state, reason per model version.
        Raises one of :data:`TritonFailure` when Triton does not answer."""
        import json

        status, body = self._request("POST", "/v2/repository/index", b"{}", True, timeout)
        if status != 200:
            return []
        entries = json.loads(body)
        return [e for e in entries if isinstance(e, dict)]

    def stop(self) -> int | None:
        """SIGTERM, wait for Triton's drain deadline (plus slack), then kill what is left."""
        return self.process.stop(timeout=self.exit_timeout_s + 5)


def _shm_regions(pids: list[int]) -> set[str]:
    """Shared-memory regions named on the command lines of ``pids`` (python-backend stubs
    are started with the name of the region they share with their server)."""
    return {m.group(0) for pid in pids for m in _SHM_REGION.finditer(cmdline(pid))}


def _unlink_regions(regions: set[str]) -> None:
    for name in regions:
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()
            log.info("removed shared memory %s of a killed tritonserver", name)


def _error_text(body: bytes) -> str:
    import json

    try:
        return str(json.loads(body).get("error", body.decode(errors="replace")))
    except ValueError:
        return body.decode(errors="replace")
