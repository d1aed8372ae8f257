"""``fedgate up``/``demo`` options that shape the stack: ``--secagg`` (turns secure
aggregation on for the trainer and every edge alike) and the demo's round table."""

from __future__ import annotations

import json

import pytest

from fedcore.errors import FedgateError
from fedcore.secagg import SecAggConfig
from fedgate.cli import _stack_config, build_parser
from fedgate.demo import RoundRow, _contributor, demo_overrides, table


def config(*argv: str):
    return _stack_config(build_parser().parse_args(["up", *argv]))


def test_secagg_sets_the_same_options_on_the_trainer_and_every_edge() -> None:
    cfg = config("--edges", "3", "--secagg", "--secagg-clip-norm", "2.5")
    trainer = json.loads(cfg.overrides["FEDGATE_TRAINER_"]["SECAGG"])
    edge = json.loads(cfg.overrides["FEDGATE_EDGE_"]["SECAGG"])
    assert trainer == edge == {"digits": {"clip_norm": 2.5}}
    assert SecAggConfig(**trainer["digits"]).clip_norm == 2.5


def test_without_secagg_nothing_is_overridden() -> None:
    assert config("--edges", "3").overrides == {}


def test_secagg_needs_three_edges() -> None:
    with pytest.raises(FedgateError, match="at least 3 edges"):
        config("--edges", "2", "--secagg")


def test_secagg_refuses_a_bad_clip_norm() -> None:
    with pytest.raises(FedgateError, match="--secagg-clip-norm: secagg clip_norm must be"):
        config("--edges", "3", "--secagg", "--secagg-clip-norm", "0")


def test_demo_table_shows_no_sample_count_for_secure_rounds() -> None:
    rows = [
        RoundRow(1, "1,2,3", 410, 0.85, 0.5, None, "v2", "promoted"),
        RoundRow(2, "1,2,3", None, 0.86, 0.46, None, "v3", "promoted"),
    ]
    header, rule, plain, secure = table(rows)
    assert header.split()[:3] == ["round", "edges", "samples"]
    assert set(rule) == {"-", " "}
    assert plain.split()[:3] == ["1", "1,2,3", "410"]
    assert secure.split()[:3] == ["2", "1,2,3", "-"]


def test_demo_async_runs_buffered_rounds() -> None:
    """``fedgate demo --async`` (DESIGN.md names it): the trainer runs buffered async
    rounds that close when every edge is in or, at the timeout, with all but one."""
    args = build_parser().parse_args(["demo", "--async", "--edges", "3"])
    assert args.asynchronous is True
    assert build_parser().parse_args(["demo"]).asynchronous is False
    trainer = demo_overrides(3, 4, asynchronous=True)["FEDGATE_TRAINER_"]
    assert trainer["ROUND_MODE"] == "async" and trainer["BUFFER_SIZE"] == "3"
    assert trainer["MIN_UPDATES"] == "2" and trainer["MAX_ROUNDS"] == "4"
    assert "ROUND_MODE" not in demo_overrides(3, 4)["FEDGATE_TRAINER_"]


def test_demo_table_marks_stale_contributors() -> None:
    record = {"base_version": 3}
    assert _contributor({"edge_id": "edge-2", "base_version": 3}, record) == "2"
    assert _contributor({"edge_id": "edge-3", "base_version": 2}, record) == "3~"
