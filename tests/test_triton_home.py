"""``FEDGATE_EDGE_TRITON_HOME``: an edge runs the tritonserver of a Triton installation
(``/opt/tritonserver`` in the official image) instead of the one in nvidia-pytriton.

Resolution and errors at unit level with a fake installation; then a real tritonserver
started through an installation laid out like the image's (the wheel's binary behind
``<home>/bin/tritonserver``, its backends in ``<home>/backends``) serves a signed version.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.repository import prepare_model
from edge_runtime.settings import EdgeSettings
from edge_runtime.triton import (
    TritonDist,
    TritonHomeError,
    TritonServer,
    prepare_backends,
    resolve_triton,
)
from fedcore.keys import ed25519_public_from_hex
from fedcore.process import free_port
from tests.conftest import SignedArtifacts, processes_mentioning

ENV = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/site/lib", "HOME": "/nonexistent"}


def fake_home(root: Path, *, binary: bool = True, executable: bool = True) -> Path:
    home = root / "tritonserver"
    (home / "backends" / "python").mkdir(parents=True)
    (home / "bin").mkdir()
    if binary:
        script = home / "bin" / "tritonserver"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755 if executable else 0o644)
    return home


def test_a_home_is_used_as_it_is(tmp_path: Path) -> None:
    home = fake_home(tmp_path)
    launch = resolve_triton(home, tmp_path / "work", ENV)
    assert launch.binary == home / "bin" / "tritonserver"
    assert launch.backends == home / "backends"
    # no stub copy, no wheel libraries: the installation brings its own
    assert launch.env["LD_LIBRARY_PATH"] == "/opt/site/lib"
    assert not (tmp_path / "work").exists()
    # models run with this interpreter's environment either way
    assert launch.env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin"


def test_the_server_command_names_the_home(tmp_path: Path) -> None:
    home = fake_home(tmp_path)
    server = TritonServer(
        name="tritonserver[t]",
        repository=tmp_path / "repo",
        work_dir=tmp_path / "work",
        host="127.0.0.1",
        http_port=18000,
        grpc_port=18001,
        metrics_port=18002,
        control_secret="s",
        triton_home=home,
    )
    argv = server.process.argv
    assert argv[0] == str(home / "bin" / "tritonserver")
    assert f"--backend-directory={home / 'backends'}" in argv
    assert f"--model-repository={tmp_path / 'repo'}" in argv


def test_without_a_home_the_wheel_is_prepared(tmp_path: Path) -> None:
    launch = resolve_triton(None, tmp_path / "work", ENV)
    dist = TritonDist.find()
    assert launch.binary == dist.binary
    assert launch.backends == tmp_path / "work" / "backends"
    assert (launch.backends / "python" / "triton_python_backend_stub").is_file()
    assert launch.env["LD_LIBRARY_PATH"] == f"{dist.libs}:/opt/site/lib"


@pytest.mark.parametrize(
    ("kwargs", "missing", "what"),
    [
        ({"binary": False}, "bin/tritonserver", "does not exist"),
        ({"executable": False}, "bin/tritonserver", "is not executable"),
    ],
)
def test_a_home_without_tritonserver_is_refused(
    tmp_path: Path, kwargs: dict[str, bool], missing: str, what: str
) -> None:
    home = fake_home(tmp_path, **kwargs)
    with pytest.raises(TritonHomeError) as info:
        resolve_triton(home, tmp_path / "work", ENV)
    assert str(info.value).startswith(
        f"FEDGATE_EDGE_TRITON_HOME={home} is not a Triton installation: "
        f"{home / missing} {what} (expected <home>/bin/tritonserver and <home>/backends"
    )
    assert info.value.missing == home / missing


def test_a_home_without_backends_is_refused(tmp_path: Path) -> None:
    home = fake_home(tmp_path)
    (home / "backends" / "python").rmdir()
    (home / "backends").rmdir()
    with pytest.raises(TritonHomeError, match=r"backends is not a directory"):
        resolve_triton(home, tmp_path / "work", ENV)
    with pytest.raises(TritonHomeError, match="is not a Triton installation"):
        resolve_triton(tmp_path / "nowhere", tmp_path / "work", ENV)


def test_the_setting_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    required = {
        "EDGE_ID": "edge-1",
        "DATA_DIR": str(tmp_path),
        "SEED_ARTIFACTS_DIR": str(tmp_path),
        "TRAINER_PUBLIC_KEY_FILE": str(tmp_path / "pub"),
        "IDENTITY_KEY_FILE": str(tmp_path / "id"),
        "TRAINER_HPKE_PUBLIC_KEY_FILE": str(tmp_path / "hpke"),
        "TRITON_CONTROL_SECRET_FILE": str(tmp_path / "ctl"),
        "NATS_USER": "edge-1",
        "NATS_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    for key, value in required.items():
        monkeypatch.setenv(f"FEDGATE_EDGE_{key}", value)
    assert EdgeSettings().triton_home is None  # type: ignore[call-arg]
    monkeypatch.setenv("FEDGATE_EDGE_TRITON_HOME", "/opt/tritonserver")
    assert EdgeSettings().triton_home == Path("/opt/tritonserver")  # type: ignore[call-arg]


def test_a_real_installation_serves(tmp_path: Path, signed_v1: SignedArtifacts) -> None:
    """The wheel's Triton laid out as an installation: a launcher script that sets its
    library path (as the image's environment does) and the backends with the stub."""
    dist = TritonDist.find()
    home = tmp_path / "opt" / "tritonserver"
    prepare_backends(dist, home / "backends")
    script = home / "bin" / "tritonserver"
    script.parent.mkdir(parents=True)
    script.write_text(
        f'#!/bin/sh\nLD_LIBRARY_PATH="{dist.libs}:$LD_LIBRARY_PATH" exec "{dist.binary}" "$@"\n'
    )
    script.chmod(0o755)
    repo = tmp_path / "repo"
    trusted = ed25519_public_from_hex(signed_v1.public_hex)
    prepare_model(repo, signed_v1.artifacts, "digits", "KIND_CPU", trusted)
    server = TritonServer(
        name="tritonserver[home]",
        repository=repo,
        work_dir=tmp_path / "work",
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        control_secret="s3cret",
        exit_timeout_s=5,
        triton_home=home,
    )
    try:
        server.start(timeout=60)
        server.load("digits")
        pixels = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
        body = {"inputs": [pixels]}
        req = urllib.request.Request(
            server.url + "/v2/models/digits/infer", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["outputs"][0]["shape"] == [1, 10]
        assert not (tmp_path / "work" / "backends").exists()  # nothing copied
        stubs = [p for p in processes_mentioning(str(home)) if "triton_python_backend_stub" in p]
        assert stubs, "the stub runs from <home>/backends"
    finally:
        server.stop()
    assert processes_mentioning(str(tmp_path)) == []
