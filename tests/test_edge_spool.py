"""Traffic capture and the spool, without Triton: the capture code exactly as model.py holds it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from edge_runtime.spool import JoinResult, Spool, is_holdout, spool_path
from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.triton_config import CaptureParams, render_config
from fedcore.triton_model import capture_source, render_model_py


def capture_module() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "capture_under_test"}
    exec(compile(capture_source(), "<capture>", "exec"), namespace)
    return namespace


def row(i: int) -> tuple[list[NDArray[Any]], list[NDArray[Any]]]:
    x = np.full((1, 64), i / 100, dtype=np.float32)
    logits = np.arange(10, dtype=np.float32).reshape(1, 10) + i
    return [x], [logits]


@pytest.fixture
def writer_factory(tmp_path: Path) -> Any:
    made = []

    def make(rate: float = 1.0, capacity: int = 100, tombstones: int = 1000) -> Any:
        path = spool_path(tmp_path, "digits")
        Spool(path).close()  # the edge creates the spool before Triton starts
        writer = capture_module()["CaptureWriter"](str(path), rate, capacity, tombstones, version=3)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        writer.close()


def test_model_py_renders_the_capture_code() -> None:
    source = render_model_py(get_spec("digits"))
    ast.parse(source)
    assert "class CaptureWriter" in source and "capture_from_config(" in source
    assert "request.request_id()" in source
    assert "CREATE TABLE IF NOT EXISTS samples" in source


def test_config_carries_the_capture_parameters() -> None:
    params = CaptureParams("/data/spool/digits.sqlite", 0.25, 500, 5000)
    text = render_config(get_spec("digits"), capture=params)
    assert (
        'parameters: { key: "fedgate_spool_path" value: { string_value: '
        '"/data/spool/digits.sqlite" } }' in text
    )
    assert 'key: "fedgate_capture_rate" value: { string_value: "0.25" }' in text
    assert 'key: "fedgate_spool_capacity" value: { string_value: "500" }' in text
    assert "fedgate_" not in render_config(get_spec("digits"))
    for bad in (
        {"spool_path": 'x"y', "rate": 0.5},
        {"spool_path": "/ok", "rate": 1.5},
        {"spool_path": "/ok", "rate": float("nan")},
    ):
        with pytest.raises(ModelSpecError):
            CaptureParams(capacity=1, tombstones=1, **bad)  # type: ignore[arg-type]


def test_capture_from_config_reads_triton_parameters(tmp_path: Path) -> None:
    mod = capture_module()
    assert mod["capture_from_config"]({}, "1") is None
    path = str(tmp_path / "s.sqlite")
    off = {"parameters": {"fedgate_spool_path": {"string_value": path}}}
    assert mod["capture_from_config"](off, "1") is None  # rate 0
    config = {
        "parameters": {
            "fedgate_spool_path": {"string_value": path},
            "fedgate_capture_rate": {"string_value": "0.5"},
            "fedgate_spool_capacity": {"string_value": "7"},
        }
    }
    writer = mod["capture_from_config"](config, "4")
    try:
        assert (writer.rate, writer.capacity, writer.tombstones, writer.version) == (
            0.5,
            7,
            70,
            4,
        )
    finally:
        writer.close()


def test_rows_are_spooled_and_labels_joined(writer_factory: Any, tmp_path: Path) -> None:
    writer = writer_factory()
    for i in range(5):
        assert writer.offer(f"req-{i}", *row(i))
    assert not writer.offer("", *row(9))  # no request id: never captured
    writer.flush()
    spool = Spool(spool_path(tmp_path, "digits"))
    assert spool.stats().samples == 5
    assert spool.join_label("req-2", 7) is JoinResult.JOINED
    assert spool.join_label("req-3", 1, weight=2.5) is JoinResult.JOINED
    assert spool.join_label("req-3", 4) is JoinResult.JOINED  # a later label replaces
    assert spool.join_label("nobody", 1) is JoinResult.UNKNOWN
    assert spool.stats().labelled == 2 and spool.new_labels() == 2
    data = spool.labelled(get_spec("digits"), holdout_fraction=0.0)
    assert sorted(data.y_train.tolist()) == [4, 7]
    pixels = data.x_train["pixels"]
    assert pixels.shape == (2, 64) and pixels.dtype == np.float32
    np.testing.assert_array_equal(np.sort(pixels[:, 0]), np.array([0.02, 0.03], dtype=np.float32))
    spool.mark_trained(data.upto)
    assert spool.new_labels() == 0
    spool.close()


def test_sampling_rate_keeps_a_share(writer_factory: Any) -> None:
    writer = writer_factory(rate=0.25)
    kept = sum(writer.offer(f"r{i}", *row(0)) for i in range(4000))
    assert 850 < kept < 1150


def test_oldest_are_evicted_with_tombstones(writer_factory: Any, tmp_path: Path) -> None:
    writer = writer_factory(capacity=4, tombstones=3)
    for i in range(6):
        writer.offer(f"req-{i}", *row(i))
    writer.flush()
    spool = Spool(spool_path(tmp_path, "digits"))
    stats = spool.stats()
    assert (stats.samples, stats.tombstones) == (4, 2)
    assert spool.join_label("req-0", 1) is JoinResult.EXPIRED
    assert spool.join_label("req-5", 1) is JoinResult.JOINED
    for i in range(6, 9):  # three more: tombstones over their own cap drop oldest first
        writer.offer(f"req-{i}", *row(i))
    writer.flush()
    assert spool.stats().tombstones == 3
    assert spool.join_label("req-0", 1) is JoinResult.UNKNOWN  # forgotten entirely
    assert spool.join_label("req-4", 1) is JoinResult.EXPIRED
    spool.close()


def test_spool_survives_a_restart_and_expires_by_age(writer_factory: Any, tmp_path: Path) -> None:
    writer = writer_factory()
    for i in range(3):
        writer.offer(f"req-{i}", *row(i))
    writer.close()
    path = spool_path(tmp_path, "digits")
    spool = Spool(path)
    spool.join_label("req-1", 3)
    spool.set_meta("note", "kept")
    spool.close()
    reopened = Spool(path)
    assert reopened.stats().samples == 3 and reopened.stats().labelled == 1
    assert reopened.get_meta("note") == "kept"
    assert reopened.expire(max_age_s=3600) == 0
    assert reopened.expire(max_age_s=0.0, now=10**10) == 3
    assert reopened.join_label("req-2", 1) is JoinResult.EXPIRED
    reopened.close()


def test_holdout_split_is_stable_and_proportional() -> None:
    ids = [f"request-{i}" for i in range(5000)]
    held = [i for i in ids if is_holdout(i, 0.2)]
    assert 900 < len(held) < 1100
    assert held == [i for i in ids if is_holdout(i, 0.2)]
    assert not any(is_holdout(i, 0.0) for i in ids)
