"""Update compression: hand-checked encodings, error feedback, strict decoding."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from fedcore.compression import (
    MODES,
    CompressionSettings,
    ErrorFeedback,
    decode_update,
    encode_update,
    sizes_from_layout,
)
from fedcore.envelope import generate_recipient_key, open_update, seal_update
from fedcore.errors import CodecError, EnvelopeError


def enc(x, sizes, mode, feedback=None, **kw):
    return encode_update(
        np.asarray(x, dtype=np.float32), sizes, CompressionSettings(mode=mode, **kw), feedback
    )


def rejected(data: bytes, mode: str, sizes) -> str:
    with pytest.raises(CodecError) as info:
        decode_update(data, mode, sizes)
    return info.value.reason


# --- hand-checked encodings ------------------------------------------------------------------


def test_none_is_little_endian_float32() -> None:
    e = enc([1.0, -2.0], [2], "none")
    assert e.data == struct.pack("<2f", 1.0, -2.0)
    assert (e.encoded_bytes, e.raw_bytes, e.values) == (8, 8, 2)
    assert decode_update(e.data, "none", [2]).tolist() == [1.0, -2.0]


def test_fp16_is_little_endian_half() -> None:
    e = enc([1.0, -2.5, 0.1], [3], "fp16")
    assert e.data == struct.pack("<3e", 1.0, -2.5, 0.1)
    assert e.encoded_bytes == 6
    out = decode_update(e.data, "fp16", [3])
    assert out.dtype == np.float32
    assert out.tolist() == [1.0, -2.5, float(np.float16(0.1))]


def test_int8_has_a_scale_per_tensor() -> None:
    e = enc([1.0, -0.5, 0.25, 0.0, 0.0], [3, 2], "int8")
    scale = np.float32(1.0 / 127)
    # -0.5 * 127 = -63.5 rounds to even (-64); 0.25 * 127 = 31.75 rounds to 32.
    assert e.data == struct.pack("<2f", scale, 0.0) + struct.pack("5b", 127, -64, 32, 0, 0)
    assert e.encoded_bytes == 13
    out = decode_update(e.data, "int8", [3, 2])
    assert out.tolist() == pytest.approx([1.0, -64 * scale, 32 * scale, 0.0, 0.0])


def test_topk_sends_the_largest_magnitudes() -> None:
    e = enc([0.1, -5.0, 0.2, 3.0, 0.0], [5], "topk", topk_fraction=0.4)
    assert e.data == struct.pack("<2I", 1, 3) + struct.pack("<2f", -5.0, 3.0)
    assert decode_update(e.data, "topk", [5]).tolist() == [0.0, -5.0, 0.0, 3.0, 0.0]


def test_topk_sends_at_least_one_value_and_nothing_for_empty() -> None:
    assert enc([0.0, 2.0, 1.0], [3], "topk", topk_fraction=0.01).encoded_bytes == 8
    assert enc([], [], "topk").data == b""
    assert decode_update(b"", "topk", [0]).size == 0


def test_bytes_reported_per_mode() -> None:
    x = np.linspace(-1, 1, 1024, dtype=np.float32)
    sizes = [1000, 24]
    got = {mode: enc(x, sizes, mode, topk_fraction=0.1).encoded_bytes for mode in MODES}
    assert got == {"none": 4096, "fp16": 2048, "int8": 8 + 1024, "topk": 103 * 8}
    assert all(enc(x, sizes, mode).raw_bytes == 4096 for mode in MODES)


def test_sizes_from_layout() -> None:
    assert sizes_from_layout([("w", (3, 4)), ("b", (4,)), ("s", ())]) == [12, 4, 1]


# --- error feedback ----------------------------------------------------------------------------


def test_int8_error_feedback_carries_the_rounding_error() -> None:
    x = np.array([1.0, 0.004], dtype=np.float32)
    scale = 1.0 / 127
    fb = ErrorFeedback(2)
    first = decode_update(enc(x, [2], "int8", fb).data, "int8", [2])
    assert first[1] == pytest.approx(scale)  # 0.004 * 127 = 0.508 rounds to 1
    assert fb.residual[1] == pytest.approx(0.004 - scale)
    sent = first.astype(np.float64)
    for _ in range(99):
        sent += decode_update(enc(x, [2], "int8", fb).data, "int8", [2])
    # With feedback the total sent tracks 100 * x within one quantum; without it, it does not.
    assert abs(sent[1] - 0.4) <= scale
    plain = sum(decode_update(enc(x, [2], "int8").data, "int8", [2])[1] for _ in range(100))
    assert abs(plain - 0.4) > 0.3


def test_topk_error_feedback_keeps_what_was_not_sent() -> None:
    fb = ErrorFeedback(5)
    x = [0.1, -5.0, 0.2, 3.0, 0.0]
    enc(x, [5], "topk", fb, topk_fraction=0.4)
    assert fb.residual.tolist() == pytest.approx([0.1, 0.0, 0.2, 0.0, 0.0])
    e = enc([0.0, 0.0, 0.0, 0.0, 0.0], [5], "topk", fb, topk_fraction=0.4)
    assert decode_update(e.data, "topk", [5]).tolist() == pytest.approx([0.1, 0.0, 0.2, 0.0, 0.0])
    fb.reset()
    assert not fb.residual.any()


def test_error_feedback_can_be_turned_off_and_must_match_size() -> None:
    fb = ErrorFeedback(2)
    enc([1.0, 0.004], [2], "int8", fb, error_feedback=False)
    assert not fb.residual.any()
    with pytest.raises(ValueError, match="error feedback holds 3 values, not 2"):
        enc([1.0, 2.0], [2], "int8", ErrorFeedback(3))


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(0, 300),
        elements=st.floats(-1e3, 1e3, width=32, allow_nan=False),
    ),
    mode=st.sampled_from(MODES),
    fraction=st.floats(0.01, 1.0),
)
def test_round_trip_error_is_bounded_and_fed_back(x, mode: str, fraction: float) -> None:
    cut = x.size // 3
    sizes = [cut, x.size - cut]
    fb = ErrorFeedback(x.size)
    e = enc(x, sizes, mode, fb, topk_fraction=fraction)
    out = decode_update(e.data, mode, sizes)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out + fb.residual, x, rtol=1e-6, atol=1e-3)
    if mode == "none":
        assert np.array_equal(out, x)
    elif mode == "fp16":
        np.testing.assert_allclose(out, x, rtol=1e-3, atol=1e-4)
    elif mode == "int8":
        for part_x, part_out in ((x[:cut], out[:cut]), (x[cut:], out[cut:])):
            bound = (np.abs(part_x).max() / 127 / 2 * 1.001) if part_x.size else 0
            assert np.all(np.abs(part_out - part_x) <= bound + 1e-6)
    else:
        kept = np.flatnonzero(out)
        np.testing.assert_array_equal(out[kept], x[kept])


# --- refusals ------------------------------------------------------------------------------


def test_non_finite_input_is_refused_before_encoding() -> None:
    for mode in MODES:
        with pytest.raises(CodecError) as info:
            enc([1.0, float("nan")], [2], mode)
        assert (
            str(info.value) == "update rejected (non-finite): update holds NaN or infinite values"
        )
    with pytest.raises(CodecError, match="beyond the float16 range"):
        enc([1e6], [1], "fp16")


def test_shape_mismatch_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="delta has 3 values, layout has 2"):
        enc([1.0, 2.0, 3.0], [2], "none")
    with pytest.raises(ValueError, match="flat vector"):
        enc([[1.0]], [1], "none")


@pytest.mark.parametrize(
    ("data", "mode", "sizes", "want"),
    [
        (b"\x00" * 7, "none", [2], "decode-error"),
        (b"\x00" * 9, "none", [2], "decode-error"),
        (struct.pack("<2f", 1.0, float("nan")), "none", [2], "non-finite"),
        (struct.pack("<2f", 1.0, float("inf")), "none", [2], "non-finite"),
        (b"\x00" * 3, "fp16", [2], "decode-error"),
        (struct.pack("<2e", 1.0, float("inf")), "fp16", [2], "non-finite"),
        (struct.pack("<f", 0.1) + b"\x01", "int8", [2], "decode-error"),
        (struct.pack("<f", float("nan")) + b"\x01\x01", "int8", [2], "non-finite"),
        (struct.pack("<f", -0.1) + b"\x01\x01", "int8", [2], "decode-error"),
        (struct.pack("<f", 0.1) + b"\x80\x01", "int8", [2], "decode-error"),
        (struct.pack("<f", 3e38) + b"\x7f\x01", "int8", [2], "non-finite"),
        (b"\x00" * 12, "topk", [4], "decode-error"),
        (struct.pack("<2I2f", 2, 1, 1.0, 1.0), "topk", [4], "decode-error"),
        (struct.pack("<2I2f", 1, 1, 1.0, 1.0), "topk", [4], "decode-error"),
        (struct.pack("<I f", 4, 1.0), "topk", [4], "decode-error"),
        (struct.pack("<5I5f", 0, 1, 2, 3, 4, *[1.0] * 5), "topk", [4], "decode-error"),
        (struct.pack("<I f", 0, float("nan")), "topk", [4], "non-finite"),
        (b"", "zstd", [0], "decode-error"),
    ],
)
def test_bad_payload_is_refused(data: bytes, mode: str, sizes, want: str) -> None:
    assert rejected(data, mode, sizes) == want


def test_codec_errors_are_envelope_errors() -> None:
    with pytest.raises(EnvelopeError) as info:
        decode_update(b"\x00" * 7, "none", [2])
    assert str(info.value) == "update rejected (decode-error): none payload is 7 bytes, expected 8"


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError):
        CompressionSettings(mode="zip")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        CompressionSettings(topk_fraction=0.0)
    with pytest.raises(ValidationError):
        CompressionSettings(topk_fraction=1.5)
    assert CompressionSettings().mode == "none"


def test_encoded_update_travels_sealed_and_decodes() -> None:
    edge, trainer = ed25519.Ed25519PrivateKey.generate(), generate_recipient_key()
    x = np.arange(-8, 8, dtype=np.float32) / 8
    e = enc(x, [10, 6], "int8")
    _, sealed = seal_update(
        e.data,
        recipient=trainer.public_key(),
        signer=edge,
        model="digits",
        round=1,
        edge_id="edge-1",
        base_version=1,
        base_digest=hashlib.sha256(b"base").hexdigest(),
        compression=e.mode,
        chunk_size=16,
    )
    header, payload = open_update(
        bytes(sealed),
        recipient=trainer,
        edge_keys={"edge-1": edge.public_key()}.get,
        max_payload=64,
    )
    assert header.compression == "int8"
    out = decode_update(payload, header.compression, [10, 6])
    np.testing.assert_allclose(out, x, atol=1 / 127)
