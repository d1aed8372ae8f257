"""A real tritonserver serving a signed version: config, outputs, control API, failures."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from edge_runtime.errors import ModelLoadError
from edge_runtime.repository import prepare_model
from edge_runtime.triton import CONTROL_HEADER, TritonServer
from fedcore.artifact import install_version, sign_version_dir
from fedcore.keys import ed25519_public_from_hex, load_ed25519
from fedcore.models import get_spec
from fedcore.params import load_flat
from fedcore.process import free_port
from fedcore.triton_config import config_summary, spec_summary
from tests.conftest import SignedArtifacts, processes_mentioning

SECRET = "s3cret-control-key"


def start_server(root: Path, signed: SignedArtifacts) -> TritonServer:
    repo = root / "repo"
    trusted = ed25519_public_from_hex(signed.public_hex)
    prepare_model(repo, signed.artifacts, "digits", "KIND_CPU", trusted)
    server = TritonServer(
        name="tritonserver[test]",
        repository=repo,
        work_dir=root / "triton",
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        control_secret=SECRET,
        exit_timeout_s=5,
    )
    server.start(timeout=60)
    server.load("digits")
    return server


@pytest.fixture(scope="module")
def triton(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("edge")
    server = start_server(root, signed_v1)
    yield server
    server.stop()
    assert processes_mentioning(str(root)) == []


def test_served_config_is_the_spec(triton: TritonServer) -> None:
    client = httpclient.InferenceServerClient(triton.url.removeprefix("http://"))
    config = client.get_model_config("digits", headers={CONTROL_HEADER: SECRET})
    assert config_summary(config) == spec_summary(get_spec("digits"), "KIND_CPU")


def test_triton_outputs_equal_torch(triton: TritonServer, signed_v1: SignedArtifacts) -> None:
    spec = get_spec("digits")
    module = spec.build_module()
    load_flat(module, signed_v1.params)
    _, _, x, _ = spec.dataset()
    x = x[:40]
    client = httpclient.InferenceServerClient(triton.url.removeprefix("http://"))
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    logits = client.infer("digits", [inp]).as_numpy("logits")
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert np.array_equal(logits.argmax(1), expected.argmax(1))


def test_model_control_requires_the_secret(triton: TritonServer) -> None:
    req = urllib.request.Request(
        triton.url + "/v2/repository/models/digits/unload", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 403
    assert triton.index()  # with the secret header the same API answers


RESTRICTED = [
    ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/systemsharedmemory/region/r/register"),
    ("GET", "/v2/cudasharedmemory/status"),
    ("POST", "/v2/cudasharedmemory/region/r/unregister"),
    ("GET", "/v2/trace/setting"),
    ("POST", "/v2/trace/setting"),
    ("GET", "/v2/logging"),
    ("POST", "/v2/logging"),
    ("GET", "/v2/models/stats"),
    ("GET", "/v2/models/digits/stats"),
    ("GET", "/v2/models/digits/config"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/digits/load"),
]


def _call(url: str, method: str, headers: dict[str, str]) -> tuple[int, bytes]:
    body = b"{}" if method == "POST" else None
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize(("method", "path"), RESTRICTED)
def test_apis_beyond_inference_need_the_secret(
    triton: TritonServer, method: str, path: str
) -> None:
    """Shared memory, trace, logging, statistics, model config and the repository are
    refused without the edge's secret header, and with a wrong one (finding 7)."""
    for headers in ({}, {CONTROL_HEADER: "guess"}, {"Authorization": f"Bearer {SECRET}"}):
        status, body = _call(triton.url + path, method, headers)
        assert status == 403, (path, headers, status, body)
        assert b"restricted" in body
    if method == "GET":  # the edge itself still reaches them with its secret
        status, body = _call(triton.url + path, method, {CONTROL_HEADER: SECRET})
        assert status == 200, (path, body)


@pytest.mark.parametrize(
    "path",
    ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/digits", "/v2/models/digits/ready"],
)
def test_health_metadata_and_inference_stay_open(triton: TritonServer, path: str) -> None:
    assert _call(triton.url + path, "GET", {})[0] == 200
    client = httpclient.InferenceServerClient(triton.url.removeprefix("http://"))
    inp = httpclient.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    assert client.infer("digits", [inp]).as_numpy("logits").shape == (1, 10)


def test_failed_load_names_model_and_keeps_serving(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    server = start_server(tmp_path, signed_v1)
    try:
        key = load_ed25519(signed_v1.private_key)
        bad = tmp_path / "bad" / "digits" / "2"
        shutil.copytree(signed_v1.artifacts / "digits" / "1", bad)
        (bad / "model.onnx").write_bytes(b"this is not an onnx file")
        sign_version_dir(bad, key, model="digits", version=2, parent_version=1)
        install_version(
            bad,
            tmp_path / "repo" / "digits",
            ed25519_public_from_hex(signed_v1.public_hex),
            version=2,
        )
        with pytest.raises(ModelLoadError, match="Triton could not load digits") as info:
            server.load("digits")
        assert info.value.model == "digits" and info.value.reason
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.is_model_ready("digits", "1")
        assert not client.is_model_ready("digits", "2")
    finally:
        server.stop()
    assert processes_mentioning(str(tmp_path)) == []
