"""Malicious model artifacts are never loaded by an edge.

``tests/test_artifact.py`` covers tampering (digest mismatch, an edited or rewritten
``model.py``, unlisted and missing files, a symlink, a wrong signer, a manifest naming
``../model.py``); ``tests/test_rollout_edge.py`` and ``tests/test_rollout_stack.py`` show
tampered and stranger-signed versions refused on the rollout path. Here, what a valid
signature does not make safe: ONNX models **signed by the trusted key** that refer to
external data (``../../etc/passwd``, an absolute path, a file beside the model, a
symlink; in an initializer, a ``Constant`` node or a subgraph), and an object store that
holds more than the manifest lists. Each is refused at verification, on the seed path
(``prepare_model``) and on the rollout path (a real nats-server's object store, the
edge's :class:`RolloutApplier`), and Triton is never asked to load it.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.repository import prepare_model
from edge_runtime.rollout import RolloutApplier, repository_versions
from fedcore.artifact import (
    MANIFEST,
    check_self_contained,
    install_version,
    sign_version_dir,
    verify_version_dir,
)
from fedcore.artifact_store import MODELS_BUCKET, model_object_name, upload_version
from fedcore.errors import ArtifactError
from fedcore.keys import ed25519_public_from_hex, load_ed25519
from fedcore.wire import DesiredVersions, ModelState
from tests.conftest import NatsServer, SignedArtifacts
from tests.rollout_harness import MODEL, write_signed

RID = "r-0123456789ab"
Tamper = Callable[[onnx.ModelProto, Path], None]


def external(tensor: TensorProto, location: str) -> None:
    """Turn ``tensor`` into a reference to ``location`` (its bytes are dropped)."""
    size = len(tensor.raw_data) or 4
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def initializer_to(location: str) -> Tamper:
    def tamper(model: onnx.ModelProto, _: Path) -> None:
        external(model.graph.initializer[0], location)

    return tamper


def beside_the_model(model: onnx.ModelProto, directory: Path) -> None:
    """A legitimate-looking external file, listed and signed in the manifest."""
    tensor = model.graph.initializer[0]
    (directory / "weights.bin").write_bytes(tensor.raw_data)
    external(tensor, "weights.bin")


def symlink_beside(model: onnx.ModelProto, directory: Path) -> None:
    os.symlink("/etc/passwd", directory / "weights.bin")
    external(model.graph.initializer[0], "weights.bin")


def in_a_constant_node(model: onnx.ModelProto, _: Path) -> None:
    value = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    external(value, "../../../../etc/shadow")
    model.graph.node.append(helper.make_node("Constant", [], ["c_out"], value=value))


def in_a_subgraph(model: onnx.ModelProto, _: Path) -> None:
    hidden = numpy_helper.from_array(np.zeros(4, np.float32), "h")
    external(hidden, "/proc/self/environ")
    out = helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [4])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["h_out"])], "b", [], [out], [hidden]
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch)
    )


CASES: dict[str, tuple[Tamper, str]] = {
    "traversal": (initializer_to("../../../../etc/passwd"), "'../../../../etc/passwd'"),
    "absolute path": (initializer_to("/etc/passwd"), "'/etc/passwd'"),
    "file beside the model": (beside_the_model, "'weights.bin'"),
    "constant node": (in_a_constant_node, "'../../../../etc/shadow'"),
    "subgraph": (in_a_subgraph, "'/proc/self/environ'"),
}


def hostile_version(
    root: Path, signed: SignedArtifacts, version: int, tamper: Tamper, *, sign: bool = True
) -> Path:
    """A version of digits whose ``model.onnx`` is changed by ``tamper``, then signed
    with the trainer key the edges trust."""
    directory = write_signed(root, signed, version, signed.params)
    (directory / MANIFEST).unlink()
    model = onnx.load(str(directory / "model.onnx"))
    tamper(model, directory)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    if sign:
        sign_version_dir(directory, load_ed25519(signed.private_key), model=MODEL, version=version)
    return directory


@pytest.mark.parametrize("case", list(CASES))
def test_signed_onnx_with_external_data_is_refused(
    tmp_path: Path, signed_v1: SignedArtifacts, case: str
) -> None:
    tamper, location = CASES[case]
    directory = hostile_version(tmp_path, signed_v1, 7, tamper)
    trusted = ed25519_public_from_hex(signed_v1.public_hex)
    with pytest.raises(ArtifactError) as info:
        verify_version_dir(directory, trusted, model=MODEL, version=7)
    assert info.value.reason == "external-data"
    assert location in info.value.detail and "model.onnx" in info.value.detail
    model_dir = tmp_path / "repo" / MODEL
    with pytest.raises(ArtifactError):
        install_version(directory, model_dir, trusted, version=7)
    assert not (model_dir / "7").exists()


def test_a_symlinked_external_file_is_refused_before_the_model_is_read(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    """The symlink cannot even be signed (the signer hashes regular files only); and
    added after signing, the verifier refuses it as an unsafe path."""
    directory = hostile_version(tmp_path, signed_v1, 7, symlink_beside, sign=False)
    with pytest.raises(ArtifactError) as info:
        sign_version_dir(directory, load_ed25519(signed_v1.private_key), model=MODEL, version=7)
    assert info.value.reason == "unsafe-path"
    (directory / "weights.bin").unlink()
    sign_version_dir(directory, load_ed25519(signed_v1.private_key), model=MODEL, version=7)
    os.symlink("/etc/passwd", directory / "weights.bin")
    with pytest.raises(ArtifactError) as info:
        verify_version_dir(directory, ed25519_public_from_hex(signed_v1.public_hex))
    assert info.value.reason == "unsafe-path"


def test_the_seed_path_refuses_it_too(tmp_path: Path, signed_v1: SignedArtifacts) -> None:
    """An edge's first start installs the newest seed version: never a hostile one."""
    seed = tmp_path / "seed"
    hostile_version(seed, signed_v1, 2, initializer_to("../../../../etc/passwd"))
    repository = tmp_path / "repo"
    trusted = ed25519_public_from_hex(signed_v1.public_hex)
    with pytest.raises(ArtifactError, match="external-data"):
        prepare_model(repository, seed, MODEL, "KIND_CPU", trusted)
    assert not (repository / MODEL / "2").exists()
    assert not (repository / MODEL / "config.pbtxt").exists()


def test_the_trainers_own_export_is_self_contained(signed_v1: SignedArtifacts) -> None:
    check_self_contained(signed_v1.artifacts / MODEL / "1" / "model.onnx")  # no raise


# -- the rollout path: object store -> verify -> repository -> Triton --------------------


class LoadRecorder:
    """Stands in for Triton's load call: records the versions it was asked to load."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.loads: list[list[int]] = []

    def load(self, model: str) -> None:
        self.loads.append(sorted(repository_versions(self.repository / model)))


def desired(stable: int, candidate: int, rollout: str = RID) -> DesiredVersions:
    return DesiredVersions(
        model=MODEL, stable=stable, candidate=candidate, rollout=rollout, ts=time.time()
    )


@pytest.fixture
async def edge(
    tmp_path: Path, nats_server: NatsServer, signed_v1: SignedArtifacts
) -> AsyncIterator[tuple[RolloutApplier, LoadRecorder, Path, nats.aio.client.Client]]:
    trusted = ed25519_public_from_hex(signed_v1.public_hex)
    repository = tmp_path / "repo"
    install_version(signed_v1.artifacts / MODEL / "1", repository / MODEL, trusted, version=1)
    recorder = LoadRecorder(repository)
    applier = RolloutApplier(
        models=[MODEL],
        repository=repository,
        work_dir=tmp_path / "scratch",
        trusted=trusted,
        load=recorder.load,
        warm=lambda _, __: None,
        retry_s=0.2,
    )
    trainer = await nats.connect(
        nats_server.url, user="trainer", password=nats_server.users["trainer"]
    )
    edge_nc = await nats.connect(
        nats_server.url, user="edge-1", password=nats_server.users["edge-1"]
    )
    applier._js = edge_nc.jetstream()
    try:
        yield applier, recorder, repository, trainer
    finally:
        await edge_nc.close()
        await trainer.close()


def refusals(applier: RolloutApplier) -> dict[int, str]:
    state = applier.annotate({MODEL: ModelState(ready=[1])})[MODEL]
    return dict(state.failed)


async def test_rollout_of_hostile_versions_never_reaches_triton(
    tmp_path: Path, signed_v1: SignedArtifacts, edge: tuple
) -> None:
    applier, recorder, repository, trainer = edge
    js = trainer.jetstream()
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    for version, case in enumerate(CASES, start=10):
        directory = hostile_version(tmp_path / "v", signed_v1, version, CASES[case][0])
        await upload_version(js, MODEL, version, directory)
        await applier.apply(desired(1, version, rollout=f"r-{version:012x}"))
        reason = refusals(applier).get(version, "")
        assert reason.startswith("refused: external-data: "), (case, reason)
        assert CASES[case][1] in reason
        assert f"{MODEL} version {version}" not in reason or "scratch" not in reason
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before
    assert recorder.loads == []  # Triton was never asked to load anything
    assert not list((tmp_path / "scratch").iterdir())  # nothing left in scratch space


async def test_objects_the_manifest_does_not_list_are_never_fetched(
    tmp_path: Path, signed_v1: SignedArtifacts, edge: tuple
) -> None:
    """Extra unsigned objects stored beside a good version (a second ``model.py``, a
    shared library, a ``../`` name) stay in the bucket; the edge installs the signed
    files only. A manifest naming an unsafe file is refused before any download."""
    applier, recorder, repository, trainer = edge
    js = trainer.jetstream()
    good = write_signed(tmp_path / "v", signed_v1, 5, signed_v1.params)
    await upload_version(js, MODEL, 5, good)
    store = await js.object_store(MODELS_BUCKET)
    for name in ["evil.py", "libbackdoor.so", "../../model.py"]:
        await store.put(model_object_name(MODEL, 5, name), b"import os; os.system('id')\n")
    await applier.apply(desired(1, 5))
    assert refusals(applier) == {}
    assert recorder.loads == [[1, 5]]
    installed = sorted(p.name for p in (repository / MODEL / "5").iterdir())
    assert installed == sorted(p.name for p in good.iterdir())
    assert "evil.py" not in installed and "libbackdoor.so" not in installed

    # a manifest (correctly signed) that lists a traversal name: refused, nothing fetched
    bad = write_signed(tmp_path / "w", signed_v1, 6, signed_v1.params)
    await upload_version(js, MODEL, 6, bad)
    forged = (bad / MANIFEST).read_text().replace('"model.py"', '"../model.py"')
    await store.put(model_object_name(MODEL, 6, MANIFEST), forged.encode())
    await applier.apply(desired(1, 6, rollout="r-00000000006a"))
    assert refusals(applier)[6].startswith("refused: unsafe-path: ")
    assert all(6 not in versions for versions in recorder.loads)
    assert not (repository / MODEL / "6").exists()
