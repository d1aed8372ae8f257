"""The example package end to end, as a user runs it (``fedgate up --edges 3 --model
pump_health``, then the demo's traffic) against real nats-server, tritonservers, edge
runtimes, trainer and gateway: the official tritonclient, through the gateway, gets
version 1's outputs equal to torch's (two inputs: FP32 [32, 3] and INT64 [1]); feedback
for the demo's requests is joined at the edges; a round releases version 2 gated by
federated evaluation (the trainer holds no pump data); its rollout is promoted; and the
demo ends better than version 1 on the model's own metric."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from fedcore.models import get_spec, use_models
from fedcore.process import free_port
from fedcore.weights import evaluation_data, load_initial_weights
from fedgate.demo import DemoPlan, demo_overrides, drive
from fedgate.launcher import Stack, StackConfig, supervised
from tests.conftest import processes_mentioning

pytestmark = pytest.mark.slow

MODEL = "pump_health"
EDGES = 3


def stack_config(data_dir: Path, rounds: int) -> StackConfig:
    overrides = demo_overrides(EDGES, rounds)
    for prefix in ("FEDGATE_TRAINER_", "FEDGATE_EDGE_", "FEDGATE_GATEWAY_"):
        overrides.setdefault(prefix, {})["MODELS"] = json.dumps([MODEL])
    return StackConfig(
        data_dir=data_dir,
        edges=EDGES,
        port=free_port(),
        overrides=overrides,
        models=(MODEL,),
    )


def tritonclient_matches_torch(stack: Stack) -> None:
    spec = get_spec(MODEL)
    module = spec.build_module()
    load_initial_weights(spec, module)
    x, _, _, _ = spec.demo_data()  # type: ignore[misc]
    window, machine = x["window"][:8], x["machine_type"][:8]
    client = httpclient.InferenceServerClient(stack.gateway_url.removeprefix("http://"))
    a = httpclient.InferInput("window", list(window.shape), "FP32")
    a.set_data_from_numpy(window, binary_data=False)
    b = httpclient.InferInput("machine_type", list(machine.shape), "INT64")
    b.set_data_from_numpy(machine, binary_data=False)
    out = httpclient.InferRequestedOutput("fault_logits", binary_data=False)
    headers = {"Authorization": f"Bearer {stack.api_key('infer')}"}
    result = client.infer(MODEL, [a, b], outputs=[out], model_version="1", headers=headers)
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(window), torch.from_numpy(machine))
    got = result.as_numpy("fault_logits")
    assert got is not None and got.shape == (8, 3)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    client.close()


@pytest.mark.timeout(600)
def test_the_example_package_serves_learns_and_rolls_out(tmp_path: Path) -> None:
    assert use_models([MODEL], deep=False) == [MODEL]  # the installed entry point
    assert evaluation_data(get_spec(MODEL)) is None  # the centre holds no data for it
    data_dir = tmp_path / "stack"
    stack = Stack(stack_config(data_dir, rounds=1))
    lines: list[str] = []
    try:
        stack.start()
        tritonclient_matches_torch(stack)
        code = asyncio.run(supervised(stack, drive(stack, DemoPlan(rounds=1), lines.append, MODEL)))
    finally:
        stack.stop()
    text = "\n".join(lines)
    joined = [line for line in lines if "labels joined at the edges" in line]
    assert joined and not joined[0].startswith("round 1: 0 requests"), text
    sent, labels = (int(w) for w in (joined[0].split()[2], joined[0].split()[5]))
    assert labels == sent > 0, text  # every label found its sample at an edge
    assert any(
        line.startswith("round 1: released (") and "(federated: 3 edges)" in line for line in lines
    ), text
    assert "round 1: rollout of v2 promoted" in text, text
    header = next(line for line in lines if "round  edges" in line)  # the per-round table
    assert "accuracy" in header.split(), text
    assert (
        code == 0
        and "demo passed: the federated model is better than version 1 on accuracy" in text
    ), text
    assert (data_dir / "trainer" / "artifacts" / MODEL / "2").is_dir()
    assert processes_mentioning(str(data_dir)) == []
