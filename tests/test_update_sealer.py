"""The edge's update path (compression with error feedback, then sealing) and the residual
kept on disk: written atomically without pickle, restored after a restart, changed only
once an update was published."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_runtime.sealer import Keys, UpdateFor, UpdateSealer
from fedcore.compression import CompressionSettings, ErrorFeedback, decode_update
from fedcore.envelope import generate_recipient_key, open_update
from fedcore.errors import ResidualFileError

SIZES = (6, 2)
TARGET = UpdateFor("digits", 4, 3, "cd" * 32)


def test_residual_file_round_trips_owner_only(tmp_path: Path) -> None:
    fb = ErrorFeedback(3)
    fb.residual = np.array([0.5, -1.25, 3e-8], dtype=np.float32)
    fb.save(tmp_path / "r.npy")
    assert os.stat(tmp_path / "r.npy").st_mode & 0o777 == 0o600
    back = ErrorFeedback.load(tmp_path / "r.npy", 3)
    assert back.residual.dtype == np.float32 and back.residual.tolist() == fb.residual.tolist()
    assert ErrorFeedback.load(tmp_path / "absent.npy", 3).residual.tolist() == [0, 0, 0]
    copy = back.copy()
    copy.residual[0] = 9.0
    assert back.residual[0] == 0.5  # a copy is independent


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros(4, dtype=np.float32), "expected float32 \\(3,\\)"),
        (np.zeros(3, dtype=np.float64), "holds float64"),
        (np.array([1.0, np.nan, 0.0], dtype=np.float32), "NaN or infinite"),
        (np.array([{"x": 1}, 2, 3], dtype=object), r"not a \.npy array"),  # pickled objects
    ],
)
def test_a_bad_residual_file_is_refused(tmp_path: Path, content: object, message: str) -> None:
    np.save(tmp_path / "r.npy", content, allow_pickle=True)
    with pytest.raises(ResidualFileError, match=message):
        ErrorFeedback.load(tmp_path / "r.npy", 3)
    (tmp_path / "t.npy").write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(ResidualFileError, match=r"not a \.npy array"):
        ErrorFeedback.load(tmp_path / "t.npy", 3)


def sealer(tmp_path: Path, mode: str = "topk", **options: object) -> UpdateSealer:
    keys = Keys(ed25519.Ed25519PrivateKey.generate(), trainer_key.public_key())
    return UpdateSealer(
        edge_id="edge-1",
        sizes=SIZES,
        compression=CompressionSettings(mode=mode, **options),  # type: ignore[arg-type]
        keys=keys,
        residual_file=tmp_path / "residual.npy",
    )


trainer_key = generate_recipient_key()


def opened(s: UpdateSealer, envelope: bytes) -> np.ndarray:
    header, payload = open_update(
        envelope,
        recipient=trainer_key,
        edge_keys={"edge-1": s.keys.signer.public_key()}.get,
        max_payload=1 << 20,
    )
    assert (header.model, header.round, header.base_version) == ("digits", 4, 3)
    assert header.compression == s.compression.mode and header.num_samples == 7
    return decode_update(payload, header.compression, SIZES)


def test_the_residual_changes_only_on_commit_and_survives_a_restart(tmp_path: Path) -> None:
    s = sealer(tmp_path, topk_fraction=0.25)  # 2 of 8 values per update
    delta = np.array([1, -8, 2, 0, 0, 3, 0.5, -0.25], dtype=np.float32)
    first = s.seal(delta, TARGET, num_samples=7, metrics={"loss": 0.5})
    np.testing.assert_array_equal(opened(s, first.envelope), [0, -8, 0, 0, 0, 3, 0, 0])
    assert not s.feedback.residual.any() and not (tmp_path / "residual.npy").exists()
    # not committed (the publish failed): the next update starts from the same residual
    again = s.seal(delta, TARGET, num_samples=7)
    np.testing.assert_array_equal(opened(s, again.envelope), [0, -8, 0, 0, 0, 3, 0, 0])
    s.commit(again)
    kept = np.array([1, 0, 2, 0, 0, 0, 0.5, -0.25], dtype=np.float32)
    np.testing.assert_array_equal(s.feedback.residual, kept)
    restarted = sealer(tmp_path, topk_fraction=0.25)
    np.testing.assert_array_equal(restarted.feedback.residual, kept)
    # next round: delta + residual; index 2 (2 + 2 = 4) and 0 (1 + 3 = 4) now lead
    second = restarted.seal(np.array([3, 0, 2, 0, 0, 0, 0, 0], np.float32), TARGET, num_samples=7)
    np.testing.assert_array_equal(opened(restarted, second.envelope), [4, 0, 4, 0, 0, 0, 0, 0])
    restarted.commit(second)
    np.testing.assert_array_equal(
        sealer(tmp_path).feedback.residual, [0, 0, 0, 0, 0, 0, 0.5, -0.25]
    )


def test_int8_residual_is_the_rounding_error(tmp_path: Path) -> None:
    s = sealer(tmp_path, mode="int8")
    delta = np.array([1.27, 0.004, -0.3, 0.0, 0.1, 0.2, 2.0, -1.0], dtype=np.float32)
    sealed = s.seal(delta, TARGET, num_samples=7)
    sent = opened(s, sealed.envelope)
    s.commit(sealed)
    np.testing.assert_array_equal(s.feedback.residual, delta - sent)
    assert np.abs(s.feedback.residual[:6]).max() <= 0.005 + 1e-7  # half a step (1.27 / 127)
    assert sealed.encoded.encoded_bytes == 4 * len(SIZES) + 8


def test_a_corrupt_residual_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "residual.npy").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, "edge_runtime.sealer"):
        s = sealer(tmp_path)
    assert not s.feedback.residual.any()
    assert "error-feedback residual dropped" in caplog.text
