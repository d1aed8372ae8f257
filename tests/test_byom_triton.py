"""A user's multi-input model served by a real tritonserver: version 1 from the user's
safetensors weights, the official tritonclient's outputs equal torch's (atol 1e-4),
including a variable-length input, and the config Triton loaded is the spec's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from edge_runtime.repository import prepare_model
from edge_runtime.triton import CONTROL_HEADER, TritonServer
from fedcore.keys import generate_ed25519, public_hex
from fedcore.models import REGISTRY, register
from fedcore.process import free_port
from fedcore.spec import ModelSpec
from fedcore.triton_config import config_summary, spec_summary
from tests.byom_models import TwoTower, make_multi, save_weights
from tests.conftest import processes_mentioning
from trainer.bootstrap import ensure_version_one

SECRET = "byom-control"


@dataclass
class Served:
    spec: ModelSpec
    module: torch.nn.Module
    server: TritonServer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("byom")
    torch.manual_seed(7)
    pretrained = TwoTower()
    spec = make_multi(save_weights(pretrained, root / "pretrained.safetensors"))
    register(spec, "tests.byom_models:make_multi")
    key = generate_ed25519(root / "keys" / "signing.key")
    artifacts = root / "artifacts"
    ensure_version_one(spec, artifacts, root / "state", key, fraction=0.1, epochs=1, seed=0)
    from fedcore.keys import ed25519_public_from_hex

    trusted = ed25519_public_from_hex(public_hex(key))
    prepare_model(root / "repo", artifacts, spec.name, "KIND_CPU", trusted)
    server = TritonServer(
        name="tritonserver[byom]",
        repository=root / "repo",
        work_dir=root / "triton",
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        control_secret=SECRET,
        exit_timeout_s=5,
    )
    try:
        server.start(timeout=90)
        server.load(spec.name)
        yield Served(spec, pretrained, server)
    finally:
        server.stop()
        REGISTRY.pop(spec.name, None)
    assert processes_mentioning(str(root)) == []


def test_served_config_is_the_user_spec(served: Served) -> None:
    client = httpclient.InferenceServerClient(served.server.url.removeprefix("http://"))
    config = client.get_model_config(served.spec.name, headers={CONTROL_HEADER: SECRET})
    assert config_summary(config) == spec_summary(served.spec, "KIND_CPU")


@pytest.mark.parametrize("length", [1, 5])
def test_tritonclient_outputs_equal_torch_for_two_inputs(served: Served, length: int) -> None:
    rng = np.random.default_rng(length)
    dense = rng.normal(size=(6, 4)).astype(np.float32)
    ids = rng.integers(0, 16, size=(6, length)).astype(np.int64)
    client = httpclient.InferenceServerClient(served.server.url.removeprefix("http://"))
    a = httpclient.InferInput("dense", list(dense.shape), "FP32")
    a.set_data_from_numpy(dense, binary_data=True)
    b = httpclient.InferInput("ids", list(ids.shape), "INT64")
    b.set_data_from_numpy(ids, binary_data=False)
    result = client.infer(served.spec.name, [a, b])
    with torch.no_grad():
        score, total = served.module.eval()(torch.from_numpy(dense), torch.from_numpy(ids))
    np.testing.assert_allclose(result.as_numpy("score"), score.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("total"), total.numpy(), atol=1e-4)
