"""The example model package ``examples/pump_health`` as a user installs it
(``pip install -e examples/pump_health``; ``make setup`` does it): found through its
``fedgate.models`` entry point, checked like any user's model, its committed version-1
weights reproduced by its own script, its demo traffic generator shaped as its spec says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from fedcore.models import ENTRY_POINT_GROUP, get_spec, use_models
from fedcore.weights import evaluation_data, load_initial_weights

REF = "pump_health"


def test_the_package_is_found_by_its_entry_point_and_passes_the_deep_check() -> None:
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert declared[REF] == "pump_health.spec:SPEC"
    assert use_models([REF]) == [REF]  # builds the module, runs it, loads the weights
    spec = get_spec(REF)
    assert [(t.name, t.datatype, t.shape) for t in spec.inputs] == [
        ("window", "FP32", (32, 3)),
        ("machine_type", "INT64", (1,)),
    ]
    assert not spec.builtin and spec.initial_weights is not None
    assert evaluation_data(spec) is None  # the trainer holds no data: the edges evaluate


def test_the_pretrain_script_reproduces_the_committed_weights(tmp_path: Path) -> None:
    spec = _load()
    assert spec.initial_weights is not None
    out = tmp_path / "v1.safetensors"
    subprocess.run(
        [sys.executable, "-m", "pump_health.pretrain", str(out)], check=True, timeout=300
    )
    fresh, committed = load_file(str(out)), load_file(str(spec.initial_weights))
    assert sorted(fresh) == sorted(committed)
    for name, value in committed.items():
        np.testing.assert_allclose(fresh[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_demo_traffic_fits_the_spec_and_version_1_has_room_to_learn() -> None:
    spec = _load()
    assert spec.demo_data is not None
    x_train, y_train, x_test, y_test = spec.demo_data()
    for x, y in ((x_train, y_train), (x_test, y_test)):
        feeds = spec.feeds(x)
        for t in spec.inputs:
            assert feeds[t.name].shape == (len(y), *t.shape)
            assert x[t.name].dtype == t.numpy_dtype
        assert set(np.unique(y)) == {0, 1, 2}
    again = spec.demo_data()
    np.testing.assert_array_equal(again[0]["window"], x_train["window"])  # seeded
    from pump_health.data import generate

    module = spec.build_module()
    load_initial_weights(spec, module)
    bench_x, bench_y = generate(300, seed=9, field=False)

    def accuracy(x: dict[str, np.ndarray], y: np.ndarray) -> float:
        with torch.no_grad():
            out = module(torch.from_numpy(x["window"]), torch.from_numpy(x["machine_type"]))
        return float((out.argmax(dim=1).numpy() == y).mean())

    # version 1 learnt the bench; the field (all machine types, lagging sensors) is new
    assert accuracy(bench_x, bench_y) > 0.9
    assert accuracy(x_test, y_test) < 0.75


def _load():  # type: ignore[no-untyped-def]
    use_models([REF], deep=False)
    return get_spec(REF)
