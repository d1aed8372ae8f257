"""Which round an edge trains for, from which served base; and what its update carries."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.learner import clip_delta, local_metrics
from edge_runtime.rounds_watch import (
    Plan,
    Refusal,
    RoundsView,
    ServedVersion,
    decide,
    served_versions,
    stage_verified,
)
from edge_runtime.worker_reports import Finished
from fedcore.artifact import Manifest
from fedcore.envelope import (
    UpdateHeader,
    generate_recipient_key,
    open_update,
    read_header_unverified,
    seal_update,
)
from fedcore.errors import ArtifactError, EnvelopeError
from fedcore.keys import ed25519_public_from_hex
from fedcore.wire import RoundAnnouncement
from tests.conftest import SignedArtifacts

D1 = hashlib.sha256(b"v1").hexdigest()
D2 = hashlib.sha256(b"v2").hexdigest()
SERVED = {
    1: ServedVersion(1, D1, Path("/v1/weights.npy")),
    2: ServedVersion(2, D2, Path("/v2/weights.npy")),
}


def announce(**fields: object) -> RoundAnnouncement:
    values: dict[str, object] = {
        "model": "digits",
        "round": 4,
        "mode": "sync",
        "base_version": 2,
        "base_digest": D2,
        "opened_ts": 100.0,
        "deadline_ts": 200.0,
    }
    values.update(fields)
    return RoundAnnouncement(**values)  # type: ignore[arg-type]


def reason(result: Plan | Refusal) -> str:
    return result.reason if isinstance(result, Refusal) else f"plan:{result.base.version}"


@pytest.mark.parametrize(
    ("fields", "sent", "now", "expected"),
    [
        ({}, set(), 150.0, "plan:2"),
        ({"base_version": 3, "base_digest": D1}, set(), 150.0, "base-not-served"),
        ({"base_digest": D1}, set(), 150.0, "base-digest-mismatch"),
        ({"sampled": ["edge-2"]}, set(), 150.0, "not-invited"),
        ({"sampled": ["edge-1"]}, set(), 150.0, "plan:2"),
        ({"state": "closed"}, set(), 150.0, "round-closed"),
        ({}, set(), 200.0, "deadline-passed"),
        ({}, {4}, 150.0, "already-sent"),
        (
            {"mode": "async", "base_version": 3, "base_digest": D1, "max_staleness": 1},
            set(),
            150.0,
            "plan:2",
        ),
        (
            {"mode": "async", "base_version": 4, "base_digest": D1, "max_staleness": 1},
            set(),
            150.0,
            "too-stale",
        ),
        (
            {"mode": "async", "base_version": 2, "base_digest": D1, "max_staleness": 1},
            set(),
            150.0,
            "base-digest-mismatch",
        ),
    ],
)
def test_decide(fields: dict[str, object], sent: set[int], now: float, expected: str) -> None:
    assert reason(decide(announce(**fields), "edge-1", SERVED, sent, now)) == expected


def test_refusals_about_the_base_are_loud() -> None:
    assert reason(decide(None, "edge-1", SERVED, set(), 0.0)) == "no-round"
    refusal = decide(announce(base_version=9), "edge-1", SERVED, set(), 150.0)
    assert isinstance(refusal, Refusal) and refusal.loud and "serves [1, 2]" in refusal.detail
    quiet = decide(announce(), "edge-1", SERVED, {4}, 150.0)
    assert isinstance(quiet, Refusal) and not quiet.loud


def test_rounds_view_applies_kv_entries() -> None:
    view = RoundsView()
    view.apply("digits", announce().encode(), deleted=False)
    assert view.get("digits") is not None and view.get("digits").round == 4  # type: ignore[union-attr]
    view.apply("digits", b'{"model": "digits"}', deleted=False)  # malformed: kept the last
    assert view.get("digits").round == 4  # type: ignore[union-attr]
    view.apply("other", announce().encode(), deleted=False)  # filed under the wrong key
    assert view.get("other") is None
    view.apply("digits", None, deleted=True)
    assert view.get("digits") is None


def test_served_versions_are_staged_and_verified(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    live = tmp_path / "repo" / "digits"
    shutil.copytree(signed_v1.artifacts / "digits" / "1", live / "1")
    (live / "1" / "__pycache__").mkdir()  # what Triton's stub leaves in a live version
    trusted = ed25519_public_from_hex(signed_v1.public_hex)

    def stage(directory: Path, version: int) -> tuple[Manifest, Path]:
        dest = tmp_path / "staged" / str(version)
        return stage_verified(directory, dest, trusted, model="digits", version=version), dest

    served = served_versions(live, [1], stage)
    manifest = json.loads((live / "1" / "manifest.json").read_text())["manifest"]
    assert served[1].digest == manifest["files"]["model.onnx"]
    assert served[1].weights == tmp_path / "staged" / "1" / "weights.npy"
    np.testing.assert_array_equal(np.load(served[1].weights), signed_v1.params)

    (live / "1" / "weights.npy").write_bytes(b"tampered")
    assert served_versions(live, [1], stage) == {}
    with pytest.raises(ArtifactError, match="digest"):
        stage(live / "1", 1)


def test_clip_delta_and_metrics() -> None:
    delta = np.array([3.0, 4.0], dtype=np.float32)
    clipped, norm = clip_delta(delta, 1.0)
    assert norm == 5.0 and np.allclose(clipped, [0.6, 0.8])
    same, _ = clip_delta(delta, None)
    np.testing.assert_array_equal(same, delta)
    counts = {"batch": 3, "samples": 40, "upto": 9}
    accuracy = Finished(
        **counts, holdout=7, loss=0.5, base_loss=None, metric="accuracy", value=0.9, base_value=None
    )
    metrics = local_metrics(accuracy, 5.0)
    assert metrics == {"delta_norm": 5.0, "holdout": 7.0, "loss": 0.5, "accuracy": 0.9}
    # a regression model reports its own metric under its own name
    regression = Finished(
        **counts, holdout=0, loss=9.0, base_loss=None, metric="mae", value=2.5, base_value=3.0
    )
    mae = local_metrics(regression, 1.0)
    assert mae == {"delta_norm": 1.0, "holdout": 0.0, "loss": 9.0, "mae": 2.5, "base_mae": 3.0}


def sealed_header(**metrics: float) -> UpdateHeader:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    header, envelope = seal_update(
        b"\x00" * 16,
        recipient=generate_recipient_key().public_key(),
        signer=ed25519.Ed25519PrivateKey.generate(),
        model="digits",
        round=1,
        edge_id="edge-1",
        base_version=1,
        base_digest=D1,
        metrics=metrics or None,
    )
    assert read_header_unverified(envelope) == header
    return header


def test_header_metrics_are_optional_and_canonical() -> None:
    plain = sealed_header()
    assert plain.metrics is None and b"metrics" not in plain.encode()
    header = sealed_header(loss=0.25, accuracy=0.875)
    assert b'"metrics":{"accuracy":0.875,"loss":0.25}' in header.encode()
    assert UpdateHeader.decode(header.encode()) == header
    null = plain.encode().replace(b',"model"', b',"metrics":null,"model"')
    with pytest.raises(EnvelopeError, match="canonical"):
        UpdateHeader.decode(null)
    for bad in (
        b'{"accuracy":NaN}',
        b'{"accuracy":1}',
        b'{"Accuracy":0.5}',
        b'{"a":"0.5"}',
        b"[0.5]",
    ):
        raw = header.encode().replace(b'{"accuracy":0.875,"loss":0.25}', bad)
        with pytest.raises(EnvelopeError, match=r"malformed|metric"):
            UpdateHeader.decode(raw)


def test_metrics_travel_signed(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    recipient, signer = generate_recipient_key(), ed25519.Ed25519PrivateKey.generate()
    _, envelope = seal_update(
        b"payload",
        recipient=recipient.public_key(),
        signer=signer,
        model="digits",
        round=1,
        edge_id="edge-1",
        base_version=1,
        base_digest=D1,
        metrics={"accuracy": 0.5},
    )
    opened, _ = open_update(
        envelope, recipient=recipient, edge_keys=lambda _: signer.public_key(), max_payload=1024
    )
    assert opened.metrics == {"accuracy": 0.5}
    forged = bytes(envelope).replace(b'"accuracy":0.5', b'"accuracy":0.9')
    with pytest.raises(EnvelopeError, match="signature"):
        open_update(
            forged, recipient=recipient, edge_keys=lambda _: signer.public_key(), max_payload=1024
        )
