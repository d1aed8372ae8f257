"""One reasoned error base (issue #19, finding 6): every ``(reason, detail)`` error derives
from :class:`fedcore.errors.ReasonedError` and declares its reasons as a ``Literal``.

Checked three ways: at run time (``REASONS``, ``ValueError`` on an undeclared reason), over
the source (every reason a raise site writes is declared; nobody reads ``reason`` through
``getattr`` or re-implements the shape), and with mypy (an undeclared reason is a type
error).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import pytest

from fedcore.errors import (
    ArtifactError,
    CodecError,
    EnrollmentError,
    EnvelopeError,
    ProcessError,
    ReasonedError,
    SecAggError,
    TransportError,
    reasons_of,
)
from fedcore.heartbeats import REFUSALS, HeartbeatRefused
from gateway.dataplane import RETRY_REASONS
from gateway.errors import GatewayError
from gateway.upstream import RetryReason, UpstreamError
from trainer.errors import AggregationError, LedgerError, TrainerError, UpdateRejected
from trainer.ingest_metrics import INGEST_REASONS
from trainer.opener import Refused

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedcore", "trainer", "edge_runtime", "gateway", "fedgate")

REASONED: tuple[type[ReasonedError[str]], ...] = (
    ProcessError,
    ArtifactError,
    SecAggError,
    EnvelopeError,
    CodecError,
    TransportError,
    EnrollmentError,
    HeartbeatRefused,
    TrainerError,
    UpdateRejected,
    AggregationError,
    LedgerError,
    Refused,
    UpstreamError,
)

# Classes with a ``reason`` attribute that is not a declared cause. ModelLoadError's
# ``reason`` is Triton's own free-text message, so it has no closed set to declare.
NOT_REASONED = {"ModelLoadError"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _reason_position(cls: type[ReasonedError[str]]) -> int:
    params = list(inspect.signature(cls.__init__).parameters)
    return params.index("reason") - 1  # without self


def _written_reasons() -> dict[str, list[tuple[str, str]]]:
    """Per class name, ``(reason, where)`` for every raise site that writes the reason as
    a string literal (the others pass a value mypy has typed)."""
    by_name = {cls.__name__: cls for cls in REASONED}
    found: dict[str, list[tuple[str, str]]] = {name: [] for name in by_name}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name not in by_name:
                continue
            at = _reason_position(by_name[name])
            arg: ast.expr | None = node.args[at] if len(node.args) > at else None
            for kw in node.keywords:
                if kw.arg == "reason":
                    arg = kw.value
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found[name].append((arg.value, where))
    return found


def test_every_reasoned_class_declares_its_reasons_on_the_base() -> None:
    for cls in REASONED:
        assert issubclass(cls, ReasonedError), cls
        assert cls.REASONS, f"{cls.__name__} declares no reasons"
        assert all(r == r.strip().lower() and " " not in r for r in cls.REASONS), cls


def test_every_reason_written_at_a_raise_site_is_declared() -> None:
    written = _written_reasons()
    assert sum(len(v) for v in written.values()) > 100  # the scan found the raise sites
    for name, sites in written.items():
        cls = next(c for c in REASONED if c.__name__ == name)
        for reason, where in sites:
            assert reason in cls.REASONS, f"{where}: {name}({reason!r}) is not declared"


def test_an_undeclared_reason_is_refused_at_run_time() -> None:
    with pytest.raises(ValueError, match="undeclared reason 'no-such-reason'"):
        ArtifactError("no-such-reason", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="undeclared reason 'malformed'"):
        CodecError("malformed", "x")  # type: ignore[arg-type]  # EnvelopeError's, not its
    with pytest.raises(ValueError, match="undeclared reason"):
        UpdateRejected("ledger-io", "x")  # type: ignore[arg-type]  # LedgerError's


def test_subclasses_narrow_their_parents_reasons() -> None:
    assert CodecError.REASONS == {"decode-error", "non-finite"} < EnvelopeError.REASONS
    for cls in (UpdateRejected, AggregationError, LedgerError):
        assert cls.REASONS < TrainerError.REASONS, cls
    assert TrainerError.REASONS < Refused.REASONS  # the aggregator's refusal passes on


def test_messages_and_fields_are_unchanged() -> None:
    cases: list[tuple[ReasonedError[str], str]] = [
        (ProcessError("nats-server", "exited", "code 1"), "nats-server: exited: code 1"),
        (ArtifactError("malformed", "x"), "artifact rejected (malformed): x"),
        (
            SecAggError("duplicate", "x", "edge-1"),
            "secure aggregation refused (duplicate) [edge edge-1]: x",
        ),
        (SecAggError("duplicate", "x"), "secure aggregation refused (duplicate): x"),
        (EnvelopeError("truncated", "x"), "update rejected (truncated): x"),
        (CodecError("non-finite", "x"), "update rejected (non-finite): x"),
        (TransportError("bad-subject", "x"), "transport (bad-subject): x"),
        (EnrollmentError("io", "x"), "edge registry (io): x"),
        (HeartbeatRefused("malformed", "x"), "malformed: x"),
        (UpdateRejected("buffer-full", "x"), "buffer-full: x"),
        (Refused("fold-failed", "x"), "fold-failed: x"),
        (UpstreamError("reset", "x"), "reset: x"),
    ]
    for error, message in cases:
        assert str(error) == message
        assert error.reason in type(error).REASONS and error.reason in message
        assert error.detail in {"x", "code 1"}
    upstream = UpstreamError("timeout", "slow")
    assert isinstance(upstream, GatewayError)
    assert (upstream.status, upstream.message, upstream.reason) == (502, "timeout: slow", "timeout")
    assert SecAggError("malformed", "x", "edge-2").edge == "edge-2"
    assert ProcessError("tritonserver", "timeout", "x").name == "tritonserver"


def test_retry_reasons_are_declared_upstream_reasons() -> None:
    assert RETRY_REASONS == reasons_of(RetryReason) == {"connect", "reset", "protocol"}
    assert RETRY_REASONS < UpstreamError.REASONS
    assert set(get_args(RetryReason)) <= UpstreamError.REASONS


def test_heartbeat_refusal_labels_are_its_declared_reasons() -> None:
    assert set(REFUSALS) == HeartbeatRefused.REASONS


def test_the_ingest_rejection_labels_are_declared_reasons() -> None:
    """The labels the ingestor's counter starts with (``duplicate`` is not an error: the
    update is acked, not refused)."""
    declared = Refused.REASONS | EnvelopeError.REASONS | TransportError.REASONS
    assert set(INGEST_REASONS) - declared == {"duplicate"}


def test_no_caller_reads_a_reason_through_getattr_or_reimplements_the_shape() -> None:
    problems = []
    for path in _sources():
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"getattr", "hasattr"}
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "reason"
            ):
                problems.append(f"{where}:{node.lineno}: {node.func.id}(..., 'reason')")
            if isinstance(node, ast.ClassDef) and node.name not in NOT_REASONED:
                for sub in ast.walk(node):
                    target = sub.targets[0] if isinstance(sub, ast.Assign) else None
                    if (
                        isinstance(target, ast.Attribute)
                        and target.attr == "reason"
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                        and str(where) != "fedcore/errors.py"
                    ):
                        problems.append(f"{where}:{sub.lineno}: {node.name} sets self.reason")
    assert not problems, "\n".join(problems)


SNIPPET = """
from fedcore.errors import ArtifactError, CodecError, ProcessError, SecAggError
from gateway.upstream import UpstreamError
from trainer.errors import TrainerError, UpdateRejected
from trainer.opener import Refused

ArtifactError("malformed", "ok")
CodecError("non-finite", "ok")
UpdateRejected("buffer-full", "ok")
Refused("buffer-full", "ok")
ArtifactError("no-such-reason", "bad")  # undeclared
CodecError("truncated", "bad")  # undeclared
ProcessError("nats-server", "crashed", "bad")  # undeclared
SecAggError("nope", "bad", "edge-1")  # undeclared
UpstreamError("refused", "bad")  # undeclared
TrainerError("oops", "bad")  # undeclared

def passes_a_str(reason: str) -> None:
    UpdateRejected(reason, "bad")  # undeclared

def compares(exc: UpstreamError) -> bool:
    return exc.reason == "timed-out"  # undeclared
"""


@pytest.mark.timeout(300)
def test_mypy_refuses_an_undeclared_reason(tmp_path: Path) -> None:
    """The static half: every raise site is type-checked against the declared Literal."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(SNIPPET).lstrip("\n"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    lines = {
        int(line.split(":")[1])
        for line in run.stdout.splitlines()
        if line.startswith(str(snippet)) and ": error:" in line
    }
    refused = {
        n for n, line in enumerate(snippet.read_text().splitlines(), 1) if "# undeclared" in line
    }
    assert len(refused) == 8
    assert lines == refused, run.stdout + run.stderr
