"""The chaos run of ``benchmarks/chaos.py``, reduced: ``fedgate up --edges 2`` with its
``--set`` options for short rounds and edges training under load, with a steady inference load
and labels through the gateway, and one SIGKILL each of an edge runtime, the trainer while
its open round holds an accepted update, and nats-server.

Targets, as the benchmark's: at most 1% of requests fail during each fault (the gateway
routes around a dead edge; inference needs neither the trainer nor NATS), everything is
back (every edge ready and serving, a round opened after the kill closed with every
edge in it) within 120 s, and
every update the edges' logs say JetStream acknowledged is counted once in its round or
came after its round had closed: none lost, none counted twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos import chaos_sets, run_faults, table
from benchmarks.chaos_stack import UpStack
from fedcore.process import free_port
from tests.conftest import processes_mentioning
from tests.test_stack import start_up

pytestmark = pytest.mark.slow

FAULTS = ["edge runtime", "trainer", "nats-server"]


@pytest.mark.timeout(480)
async def test_the_fleet_stays_up_through_kills_and_no_update_is_lost(
    tmp_path: Path, record_property: Any
) -> None:
    data_dir = tmp_path / "stack"
    options = ["--edges", "2", *(f"--set={item}" for item in chaos_sets())]
    stack = UpStack(*start_up(options, free_port(), data_dir), data_dir)
    try:
        rows, ledger, load = await run_faults(stack, FAULTS, clients=3, recover_s=120)
        restarts = stack.restarts()
    finally:
        assert stack.stop() == 0
    assert processes_mentioning(str(data_dir)) == []
    report = table(rows, ledger)
    record_property("chaos", report)
    assert [r.fault for r in rows] == FAULTS
    for row in rows:
        assert row.recovery_s is not None, report
        assert row.requests > 0 and row.failed_share <= 0.01, report
    assert rows[1].killed.endswith("had an update"), rows[1].killed  # killed mid-round
    assert restarts["edge-2"] == restarts["trainer"] == restarts["nats-server"] == 1, restarts
    assert ledger.ok, report
    assert ledger.counted >= 4, report  # rounds went on: updates before and after the kills
    assert len(load.shots) >= 100
