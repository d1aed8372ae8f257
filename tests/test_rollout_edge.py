"""The edge's side of rollouts against a real nats-server's object store and KV: verify
before install, refuse tampered, unsigned and missing artifacts (the repository stays as
it was), load beside the stable version, drop what is no longer desired, report it all in
the heartbeat. Triton is replaced by a recorder here (test_rollout_stack runs real ones)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import numpy as np
import pytest

from edge_runtime.errors import ModelLoadError
from edge_runtime.label_tally import tally_labels
from edge_runtime.rollout import RolloutApplier, WarmUpError, repository_versions
from fedcore.artifact import install_version, sign_version_dir
from fedcore.artifact_store import upload_version
from fedcore.keys import ed25519_public_from_hex, generate_ed25519
from fedcore.triton_model import SPOOL_SCHEMA
from fedcore.wire import DESIRED_BUCKET, DesiredVersions, LabelTally, ModelState
from tests.conftest import NatsServer, SignedArtifacts
from tests.rollout_harness import MODEL, write_signed

RID = "r-0123456789ab"


class FakeTriton:
    def __init__(self) -> None:
        self.loads: list[list[int]] = []
        self.repository: Path | None = None
        self.fail_next: str | None = None

    def load(self, model: str) -> None:
        assert self.repository is not None
        if self.fail_next is not None:
            reason, self.fail_next = self.fail_next, None
            raise ModelLoadError(model, None, reason)
        self.loads.append(sorted(repository_versions(self.repository / model)))


def desired(stable: int, candidate: int | None = None, rollout: str = RID) -> DesiredVersions:
    return DesiredVersions(
        model=MODEL, stable=stable, candidate=candidate, rollout=rollout, ts=time.time()
    )


@pytest.fixture
async def setup(
    tmp_path: Path, nats_server: NatsServer, signed_v1: SignedArtifacts
) -> AsyncIterator[tuple[RolloutApplier, FakeTriton, Path]]:
    trusted = ed25519_public_from_hex(signed_v1.public_hex)
    repository = tmp_path / "repo"
    install_version(signed_v1.artifacts / MODEL / "1", repository / MODEL, trusted, version=1)
    versions = tmp_path / "versions"
    dirs = {v: write_signed(versions, signed_v1, v, signed_v1.params) for v in (2, 3, 4)}
    onnx = dirs[3] / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")  # tampered after signing
    sign_version_dir(dirs[4], generate_ed25519(tmp_path / "stranger.key"), model=MODEL, version=4)
    nc = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    for v, d in dirs.items():
        await upload_version(nc.jetstream(), MODEL, v, d)
    await nc.close()
    triton = FakeTriton()
    triton.repository = repository
    warmed: list[int] = []
    applier = RolloutApplier(
        models=[MODEL],
        repository=repository,
        work_dir=tmp_path / "scratch",
        trusted=trusted,
        load=triton.load,
        warm=lambda _, v: warmed.append(v),
        retry_s=0.2,
    )
    edge_nc = await nats.connect(
        nats_server.url, user="edge-1", password=nats_server.users["edge-1"]
    )
    applier._js = edge_nc.jetstream()
    yield applier, triton, repository
    await edge_nc.close()


def beat(applier: RolloutApplier, ready: list[int]) -> ModelState:
    return applier.annotate({MODEL: ModelState(ready=ready, failed={1: "unloaded"})})[MODEL]


async def test_good_version_is_loaded_beside_then_alone(setup: tuple) -> None:
    applier, triton, repository = setup
    await applier.apply(desired(1, 2))
    assert repository_versions(repository / MODEL) == {1, 2}
    assert triton.loads == [[1, 2]]
    state = beat(applier, [1, 2])
    assert state.rollout == RID and state.failed == {}  # 'unloaded' is not a failure
    await applier.apply(desired(2))
    assert repository_versions(repository / MODEL) == {2}
    assert triton.loads == [[1, 2], [2]]
    await applier.apply(desired(2))  # nothing to do: no load
    assert len(triton.loads) == 2
    assert not list((repository.parent / "scratch").iterdir())


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        (3, "refused: digest-mismatch: model.onnx: SHA-256 differs from the manifest"),
        (4, "refused: bad-signature: digits version 4: not signed by the trusted key"),
        (5, "refused: missing-file: object 'digits/5/manifest.json' is not in fedgate_models"),
    ],
)
async def test_bad_artifacts_never_reach_the_repository(
    setup: tuple, version: int, reason: str
) -> None:
    applier, triton, repository = setup
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    await applier.apply(desired(1, version))
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before
    assert triton.loads == []  # Triton was never asked to load anything
    assert beat(applier, [1]).failed == {version: reason}
    # the gateway gives up on the candidate: the refusal stays reported for this rollout
    await applier.apply(desired(1))
    assert beat(applier, [1]).failed == {version: reason}
    await applier.apply(desired(1, rollout="r-ffffffffffff"))
    assert beat(applier, [1]).failed == {}


async def test_a_version_over_the_edges_artifact_limit_is_refused(setup: tuple) -> None:
    applier, triton, repository = setup
    applier.max_artifact_bytes = 1000  # the setting FEDGATE_EDGE_MAX_ARTIFACT_BYTES
    await applier.apply(desired(1, 2))
    assert triton.loads == [] and repository_versions(repository / MODEL) == {1}
    (reason,) = beat(applier, [1]).failed.values()
    assert reason.startswith("refused: malformed: object 'digits/2/") and "limit" in reason


async def test_load_or_warm_up_failure_removes_the_candidate(setup: tuple) -> None:
    applier, triton, repository = setup
    triton.fail_next = "failed to load 'digits' version 2: boom"
    await applier.apply(desired(1, 2))
    assert repository_versions(repository / MODEL) == {1}
    assert beat(applier, [1]).failed == {2: "load failed: failed to load 'digits' version 2: boom"}

    def broken(model: str, version: int) -> None:
        raise WarmUpError(f"warm-up failed: version {version} of {model}: HTTP 500")

    applier.warm = broken
    await applier.apply(desired(1, 2, rollout="r-ffffffffffff"))
    assert repository_versions(repository / MODEL) == {1}
    assert triton.loads == [[1, 2], [1]]  # loaded, failed warm-up, unloaded again
    assert beat(applier, [1]).failed[2].startswith("warm-up failed")


async def test_watcher_follows_the_desired_bucket(setup: tuple, nats_server: NatsServer) -> None:
    applier, _, repository = setup
    nc = await nats.connect(nats_server.url, user="gateway", password=nats_server.users["gateway"])
    kv = await nc.jetstream().create_key_value(bucket=DESIRED_BUCKET)
    edge_nc = await nats.connect(
        nats_server.url, user="edge-1", password=nats_server.users["edge-1"]
    )
    await applier.start(edge_nc)
    try:
        await kv.put(MODEL, desired(1, 2).encode())
        await kv.put("other", b"not json")  # not ours: ignored
        for _ in range(300):
            if beat(applier, [1, 2]).rollout == RID:
                break
            await asyncio.sleep(0.05)
        assert repository_versions(repository / MODEL) == {1, 2}
    finally:
        await applier.stop()
        await edge_nc.close()
        await nc.close()


def test_label_tally_per_version(tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite"
    conn = sqlite3.connect(spool)
    conn.executescript(SPOOL_SCHEMA)
    rows = [(1, 3, 3), (1, 3, 4), (2, 5, 5), (2, 5, 5), (2, 7, None)]  # version, answer, label
    for i, (version, answer, label) in enumerate(rows):
        logits = np.zeros(10, dtype="<f4")
        logits[answer] = 1.0
        conn.execute(
            "INSERT INTO samples (request_id, captured_ts, version, inputs, outputs, label) "
            "VALUES (?, 0, ?, x'', ?, ?)",
            (f"r{i}", version, logits.tobytes(), label),
        )
    conn.commit()
    conn.close()
    assert tally_labels(spool, MODEL, [1, 2]) == {
        1: LabelTally(total=2, correct=1, score=1.0),
        2: LabelTally(total=2, correct=2, score=2.0),
    }
    assert tally_labels(spool, MODEL, [3]) == {}
    assert tally_labels(tmp_path / "absent.sqlite", MODEL, [1]) == {}
