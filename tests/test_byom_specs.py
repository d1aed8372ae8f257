"""Resolving a user's model spec: references, entry points, and every refusal, each named.

User models are real Python modules written into a temporary directory on ``sys.path``;
the entry point is a real ``.dist-info`` that ``importlib.metadata`` discovers there.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedcore.errors import ModelSpecError
from fedcore.models import ENTRY_POINT_GROUP, REGISTRY, get_spec, use_models

HEADER = """
import torch
from torch import nn
from fedcore.spec import ModelSpec, TensorSpec
from fedcore.task import LabelKind, Loss, Task
"""


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(REGISTRY)
    yield tmp_path
    REGISTRY.clear()
    REGISTRY.update(before)
    for name in [m for m in sys.modules if m.startswith("usr_")]:
        del sys.modules[name]


def write_module(root: Path, name: str, body: str) -> None:
    (root / f"{name}.py").write_text(HEADER + textwrap.dedent(body))


REG = """
class Reg(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

def spec(name="usr_reg", out_shape=(1,), out_type="FP32", weights=None, factory=Reg):
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("x", "FP32", (3,)),),
        outputs=(TensorSpec("y", out_type, out_shape),),
        module_factory=factory,
        task=Task(loss=Loss.MSE, label=LabelKind.FLOAT, metric="mae"),
        initial_weights=weights,
    )
"""


def test_a_module_attribute_reference_resolves_and_registers(user_dir: Path) -> None:
    weights = user_dir / "reg.safetensors"
    save_file({"lin.weight": torch.ones(1, 3), "lin.bias": torch.zeros(1)}, str(weights))
    write_module(user_dir, "usr_good", REG + f"SPEC = spec(weights={str(weights)!r})\n")
    assert use_models(["usr_good:SPEC"]) == ["usr_reg"]
    spec = get_spec("usr_reg")
    assert spec.task.metric == "mae" and not spec.task.metric_spec.higher_is_better


def test_an_entry_point_is_found_by_name(user_dir: Path) -> None:
    weights = user_dir / "reg.safetensors"
    save_file({"lin.weight": torch.ones(1, 3), "lin.bias": torch.zeros(1)}, str(weights))
    write_module(
        user_dir, "usr_ep", REG + f"SPEC = spec('usr_epmodel', weights={str(weights)!r})\n"
    )
    info = user_dir / "usr_ep_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: usr-ep-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nusr_epmodel = usr_ep:SPEC\n")
    assert use_models(["usr_epmodel"]) == ["usr_epmodel"]
    assert get_spec("usr_epmodel").outputs[0].name == "y"


def test_builtins_are_also_declared_as_entry_points() -> None:
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert declared.get("digits") == "fedcore.models.digits:DIGITS"
    assert declared.get("diabetes") == "fedcore.models.diabetes:DIABETES"


REFUSALS = [
    (
        "dup",
        """
        SPEC = ModelSpec(name="usr_dup", inputs=(TensorSpec("t", "FP32", (3,)),),
            outputs=(TensorSpec("t", "FP32", (1,)),), module_factory=lambda: nn.Linear(3, 1))
        """,
        "model spec 'usr_dup:SPEC': model 'usr_dup': duplicate tensor names ['t']",
    ),
    (
        "dtype",
        """
        SPEC = ModelSpec(name="usr_dt", inputs=(TensorSpec("x", "BYTES", (3,)),),
            outputs=(TensorSpec("y", "FP32", (1,)),), module_factory=lambda: nn.Linear(3, 1))
        """,
        "model spec 'usr_dtype:SPEC': tensor 'x': unsupported datatype 'BYTES'",
    ),
    (
        "shape",
        REG + "SPEC = spec(out_shape=(2,))\n",
        "model spec 'usr_shape:SPEC': outputs: 'y' is declared [batch, 2] but the module "
        "returns shape [4, 1]",
    ),
    (
        "odtype",
        REG + "SPEC = spec(out_type='FP64')\n",
        "model spec 'usr_odtype:SPEC': outputs: 'y' is declared FP64 "
        "but the module returns float32",
    ),
    (
        "noweights",
        REG + "SPEC = spec()\n",
        "model spec 'usr_noweights:SPEC': initial_weights: needed",
    ),
    (
        "notspec",
        "SPEC = 42\n",
        "model spec 'usr_notspec:SPEC': usr_notspec:SPEC is a int, not a fedcore.spec.ModelSpec",
    ),
]


@pytest.mark.parametrize(("name", "body", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_invalid_specs_are_refused_naming_spec_field_and_problem(
    user_dir: Path, name: str, body: str, message: str
) -> None:
    write_module(user_dir, f"usr_{name}", body)
    with pytest.raises(ModelSpecError) as info:
        use_models([f"usr_{name}:SPEC"])
    assert str(info.value).startswith(message), str(info.value)


def test_unknown_references_are_named(user_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match="model spec 'usr_missing:SPEC': cannot import"):
        use_models(["usr_missing:SPEC"])
    with pytest.raises(ModelSpecError, match="model spec 'nothing_here': unknown"):
        use_models(["nothing_here"])


@pytest.mark.parametrize(
    ("tensors", "problem"),
    [
        ({"lin.weight": torch.ones(1, 3)}, "names do not match the module (missing ['lin.bias']"),
        (
            {"lin.weight": torch.ones(1, 3), "lin.bias": torch.zeros(1), "extra": torch.zeros(2)},
            "unexpected ['extra']",
        ),
        (
            {"lin.weight": torch.ones(1, 4), "lin.bias": torch.zeros(1)},
            "shapes do not match the module: lin.weight: file (1, 4), module (1, 3)",
        ),
    ],
)
def test_initial_weights_must_match_the_module(
    user_dir: Path, tensors: dict[str, torch.Tensor], problem: str
) -> None:
    weights = user_dir / "w.safetensors"
    save_file(tensors, str(weights))
    write_module(user_dir, "usr_w", REG + f"SPEC = spec(weights={str(weights)!r})\n")
    with pytest.raises(ModelSpecError) as info:
        use_models(["usr_w:SPEC"])
    text = str(info.value)
    assert text.startswith("model spec 'usr_w:SPEC': model 'usr_reg' initial_weights:"), text
    assert problem in text


class _Tripwire:
    """Unpickling this creates ``path``: proof that a loader unpickled the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("kind", ["pickle", "torch-save"])
def test_a_pickle_given_as_weights_is_refused_unread(user_dir: Path, kind: str) -> None:
    tripwire = user_dir / "unpickled"
    weights = user_dir / "w.safetensors"  # the name does not matter, the bytes do
    if kind == "pickle":
        weights.write_bytes(pickle.dumps(_Tripwire(tripwire), protocol=4))
    else:
        torch.save({"lin.weight": _Tripwire(tripwire)}, weights)
    write_module(user_dir, "usr_pk", REG + f"SPEC = spec(weights={str(weights)!r})\n")
    with pytest.raises(ModelSpecError, match="file; refused \\(use safetensors\\)"):
        use_models(["usr_pk:SPEC"])
    assert not tripwire.exists()


def test_a_service_with_an_invalid_spec_exits_2_naming_it(user_dir: Path, tmp_path: Path) -> None:
    write_module(user_dir, "usr_svc", REG + "SPEC = spec(out_shape=(5,))\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")},
        "PYTHONPATH": os.pathsep.join([str(user_dir), str(Path.cwd())]),
        "FEDGATE_TRAINER_MODELS": '["usr_svc:SPEC"]',
        "FEDGATE_TRAINER_DATA_DIR": str(tmp_path / "t"),
        "FEDGATE_TRAINER_SIGNING_KEY_FILE": str(tmp_path / "none.key"),
        "FEDGATE_TRAINER_HPKE_PRIVATE_KEY_FILE": str(tmp_path / "none.hpke"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "bootstrap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "FEDGATE_TRAINER_MODELS" in done.stderr
    assert "model spec 'usr_svc:SPEC': outputs: 'y' is declared [batch, 5]" in done.stderr


def test_cli_refuses_a_bad_model_with_exit_2(user_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgate.cli",
            "up",
            "--model",
            "usr_nowhere:SPEC",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "model spec 'usr_nowhere:SPEC': cannot import" in done.stderr


def test_npz_evaluation_sets_load_without_pickle(user_dir: Path) -> None:
    from fedcore.weights import load_evaluation_file

    spec = get_spec("diabetes")
    good = user_dir / "eval.npz"
    np.savez(good, features=np.zeros((5, 10), np.float32), y=np.ones((5, 1), np.float32))
    x, y = load_evaluation_file(spec, good)
    assert x.shape == (5, 10) and y.shape == (5, 1)
    objects = user_dir / "objects.npz"
    np.savez(objects, features=np.array([object()] * 5), y=np.ones((5, 1)))
    with pytest.raises(ModelSpecError, match=r"not a readable \.npz"):
        load_evaluation_file(spec, objects)
    missing = user_dir / "missing.npz"
    np.savez(missing, y=np.ones(3))
    with pytest.raises(ModelSpecError, match=r"lacks arrays \['features'\]"):
        load_evaluation_file(spec, missing)
