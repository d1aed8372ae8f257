"""The CLI's rich tables and progress display (issue 19, finding 8): the demo's round
table in plain mode (columns, values, the metric's name and direction) and drawn for a
terminal; :class:`fedgate.progress.Waits` writing a line per state change when not on a
terminal and a live display when on one; ``fedgate status`` choosing by its stdout, with
its exit codes unchanged."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from fedcore.keys import write_secret
from fedcore.process import free_port
from fedcore.task import METRICS
from fedgate.cli import main
from fedgate.demo_table import RoundRow, table
from fedgate.progress import Waits
from tests.test_status import KEY, gateway  # noqa: F401 - the stub gateway fixture

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ROWS = [
    RoundRow(1, "1,2,3", 289, 0.856, 0.513, None, "v2", "promoted", 0.829, 0.019),
    RoundRow(2, "1,2~", None, 0.842, 0.4, 1.25, "held", "-", 0.856, None),
]


def test_demo_table_plain_columns_values_and_the_metrics_direction() -> None:
    lines = table(ROWS, METRICS["accuracy"])
    assert lines == [
        "round  edges  samples  accuracy  vs serving   loss  epsilon  released  rollout",
        "------ ------ -------- --------- ----------- ------ -------- --------- --------",
        "    1  1,2,3      289     0.856  +2.7 ± 1.9  0.513        -  v2        promoted",
        "    2  1,2~         -     0.842        -1.4  0.400     1.25  held      -",
        "(accuracy: higher is better; vs serving: candidate minus serving, x100, ± one paired "
        "standard error)",
    ]
    regression = table([RoundRow(1, "1,2", 400, 46.78, 3000.0)], METRICS["mae"])
    assert regression[0].split()[3] == "mae" and regression[2].split()[3] == "46.780"
    assert regression[-1].startswith("(mae: lower is better;")


def test_a_metric_in_its_own_units_is_compared_in_those_units() -> None:
    """An MAE of 46.8 against 48.1 is 1.3 better, not '-130.0' points (the change was shown
    x100 for every metric)."""
    row = RoundRow(1, "1,2", 400, 46.78, 3000.0, serving=48.1, se=0.52)
    lines = table([row], METRICS["mae"])
    assert "-1.3 ± 0.5" in lines[2]
    assert lines[-1].startswith("(mae: lower is better; vs serving: candidate minus serving, in")
    small = RoundRow(1, "1", 10, 0.0123, 1.0, serving=0.0150, se=0.0004)
    assert "-0.0027 ± 0.0004" in table([small], METRICS["mse"])[2]
    assert "+2.7 ± 1.9" in table(ROWS, METRICS["accuracy"])[2]


def test_demo_table_for_a_terminal_has_the_same_cells_in_colour(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    lines = table(ROWS, METRICS["accuracy"], fancy=True)
    assert any("\x1b[" in line for line in lines) and "━" in lines[1]
    plain = [ANSI.sub("", line) for line in lines]
    header = "round edges samples accuracy vs serving loss epsilon released rollout"
    assert plain[0].split() == header.split(" ")
    row = "1 1,2,3 289 0.856 +2.7 ± 1.9 0.513 - v2 promoted"
    assert plain[2].split() == row.split(" ")
    assert "\x1b[32mpromoted" in lines[2] and "\x1b[33mheld" in lines[3]


def test_waits_write_a_line_per_state_change_when_not_on_a_terminal() -> None:
    lines: list[str] = []
    with Waits(lines.append) as waits:
        assert not waits.live
        with waits.wait("round 1: the trainer's verdict", timeout_s=150) as wait:
            for state in ("edges training", "edges training", "trainer aggregating"):
                wait.state(state)
        with waits.wait("the stack to start", steps=2) as wait:
            step = wait.stepper()
            for text in ("nats-server healthy", "edge-1: its Triton ready", "ready"):
                step(text)
        sub = waits.prefixed("[mae] ", lambda line: lines.append(f"[mae] {line}"))
        with sub.wait("round 2 to open") as wait:
            wait.state("\x1b[2Jclosed")
    assert [re.sub(r"\(\d+s\)$", "(Ns)", line) for line in lines] == [
        "  waiting for round 1: the trainer's verdict (up to 150s)",
        "  round 1: the trainer's verdict: edges training (Ns)",
        "  round 1: the trainer's verdict: trainer aggregating (Ns)",
        "  waiting for the stack to start",
        "  the stack to start: nats-server healthy (Ns)",
        "  the stack to start: edge-1: its Triton ready (Ns)",
        "  the stack to start: ready (Ns)",
        "[mae]   waiting for round 2 to open",
        "[mae]   round 2 to open: ?[2Jclosed (Ns)",  # no escape code reaches the output
    ]


def test_waits_on_a_terminal_draw_a_live_display_with_lines_and_logs_above() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, force_interactive=True, width=120)
    lines: list[str] = []
    log = logging.getLogger("test_cli_display")
    stderr = sys.stderr
    handler = logging.StreamHandler(stderr)
    logging.getLogger().addHandler(handler)
    try:
        with Waits(lines.append, live=True, console=console) as waits:
            assert waits.live
            with waits.wait("rollout r-1 of v2", timeout_s=60) as wait:
                wait.state("canary at 10% of traffic")
                log.warning("a log line while waiting")
                with waits.wait("the stack to start", steps=4) as steps:
                    steps.state("nats-server healthy", advance=1)
                    time.sleep(0.3)
                    assert waits.progress is not None
                    waits.progress.refresh()  # drawn now, whatever the load
            assert handler.stream is not stderr  # routed above the display
        assert handler.stream is stderr  # and given back
    finally:
        logging.getLogger().removeHandler(handler)
    drawn = ANSI.sub("", screen.getvalue())
    assert "rollout r-1 of v2" in drawn and "canary at 10% of traffic" in drawn
    assert re.search(r"\d+s left", drawn) and "1/4" in drawn and "0:00:0" in drawn
    assert "a log line while waiting" in drawn
    assert lines == []  # no state line: the display shows the states


def test_status_is_plain_in_a_pipe_and_drawn_when_told_it_is_a_terminal(
    gateway: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    argv = [sys.executable, "-m", "fedgate.cli", "status", "--url", gateway]
    argv += ["--key-file", str(key_file), "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    piped = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout
    assert "  edge-1  cpu     ok          digits v1,v2" in piped.stdout
    env |= {"TTY_COMPATIBLE": "1", "COLUMNS": "150"}
    drawn = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert drawn.returncode == 0, drawn.stderr
    assert "\x1b[" in drawn.stdout and "━" in drawn.stdout
    assert re.search(r"edge-1 +cpu +\S*ok", ANSI.sub("", drawn.stdout))


def test_status_exit_codes_are_unchanged(gateway: str, tmp_path: Path) -> None:  # noqa: F811
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    base = ["status", "--key-file", str(key_file), "--data-dir", str(tmp_path)]
    assert main([*base, "--url", gateway]) == 0
    assert main([*base, "--url", f"http://127.0.0.1:{free_port()}"]) == 3  # unreachable
    write_secret(key_file, "fgk_wrong")
    assert main([*base, "--url", gateway]) == 1  # refused


def test_status_output_json_for_scripts(gateway: str, tmp_path: Path, capsys) -> None:  # noqa: F811
    """``--output json``: the gateway's answers as they are, a refused section named."""
    key_file = tmp_path / "key"
    write_secret(key_file, KEY)
    argv = ["status", "--url", gateway, "--key-file", str(key_file), "--output", "json"]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["processes"] is None  # no fedgate up runs there
    assert [e["edge_id"] for e in doc["edges"]] == ["edge-1", "edge-2"]
    digits = doc["models"]["digits"]
    assert digits["versions"]["versions"][0]["version"] == 2
    assert digits["rounds"]["rounds"][0]["outcome"] == "released"
    assert digits["rounds"]["open"]["round"] == 4
    assert digits["rollouts"]["status"] == 403 and "needs 'admin'" in digits["rollouts"]["error"]
    assert main([*argv, "--url", f"http://127.0.0.1:{free_port()}"]) == 3
