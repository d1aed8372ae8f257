"""What a command is waiting for: a live progress display on a terminal, lines elsewhere.

``fedgate up`` (the stack's start), ``fedgate demo`` (the stack's start, rounds opening
and closing, rollouts settling) and ``fedgate rollout start --wait`` wait for things that
take seconds to minutes. :class:`Waits` shows each wait:

- on an interactive terminal, one live line per wait under the command's own output: a
  spinner, what is waited for, its state now, a bar when it counts steps, the time
  elapsed and the time left before it gives up;
- anywhere else (a pipe, CI, a test), no animation and no escape codes: one line when a
  wait starts and one each time its state changes.

The command's own lines (``out``) and its log lines print above the live display.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from fedgate.display import cell

Out = Callable[[str], None]


def is_interactive() -> bool:
    """True on a terminal that can redraw a line (not a pipe, not ``TERM=dumb``;
    ``TTY_INTERACTIVE=0`` turns it off)."""
    return Console().is_interactive


class TimeLeftColumn(ProgressColumn):
    """Seconds before a wait gives up (its ``deadline`` field, a monotonic time)."""

    def render(self, task: Task) -> Text:
        deadline = task.fields.get("deadline")
        if deadline is None:
            return Text("")
        return Text(f"{max(0.0, deadline - time.monotonic()):.0f}s left", style="dim")


class StepsBar(ProgressColumn):
    """A bar for a wait that counts steps; nothing for one that does not."""

    def __init__(self, bar_width: int = 20) -> None:
        super().__init__()
        self.bar = BarColumn(bar_width=bar_width)

    def render(self, task: Task) -> RenderableType:
        return Text("") if task.total is None else self.bar.render(task)


class StepsColumn(ProgressColumn):
    """``done/total`` steps of a wait that counts them."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{task.completed:.0f}/{task.total:.0f}")


@dataclass
class Wait:
    """One wait in progress; :meth:`state` reports where it stands."""

    what: str
    out: Out
    progress: Progress | None
    task: TaskID | None
    started: float = field(default_factory=time.monotonic)
    current: str = ""

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def state(self, text: str, advance: int = 0) -> None:
        """Where the wait stands now; a line (when not live) only if it changed.
        ``advance``: steps done, for a wait that counts them."""
        text = cell(text)
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, state=text, advance=advance)
        elif text != self.current:
            self.out(f"  {self.what}: {text} ({self.elapsed_s:.0f}s)")
        self.current = text

    def stepper(self) -> Callable[[str], None]:
        """A callback for a wait that goes through steps: each call names what is waited
        for next and counts the step before it as done."""
        calls = 0

        def step(text: str) -> None:
            nonlocal calls
            self.state(text, advance=1 if calls else 0)
            calls += 1

        return step


class Waits:
    """The waits of one command. Use it as a context manager around them: on a terminal
    (``live``) it runs the live display meanwhile; :meth:`wait` for each wait."""

    def __init__(self, out: Out, *, live: bool = False, console: Console | None = None) -> None:
        self.out = out
        self.prefix = ""
        self.progress: Progress | None = None
        self._owner = live  # starts and stops the display (a prefixed view does not)
        self._saved: list[tuple[logging.StreamHandler[Any], Any]] = []
        if live:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                TextColumn("{task.fields[state]}", style="dim", markup=False),
                StepsBar(bar_width=20),
                StepsColumn(),
                TimeElapsedColumn(),
                TimeLeftColumn(),
                console=console,
                transient=True,
                refresh_per_second=4,
            )

    @property
    def live(self) -> bool:
        """True when the waits are drawn live (for a terminal)."""
        return self.progress is not None

    def __enter__(self) -> Waits:
        if self.progress is not None and self._owner:
            streams = (sys.stdout, sys.stderr)
            self.progress.start()  # replaces sys.stdout and sys.stderr on a terminal
            self._logs_above(*streams)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.progress is not None and self._owner:
            for handler, stream in self._saved:
                handler.setStream(stream)
            self._saved.clear()
            self.progress.stop()

    def _logs_above(self, stdout: Any, stderr: Any) -> None:
        """Log handlers that wrote to ``stdout``/``stderr`` write where the live display
        redirected them, so that their lines print above it."""
        redirected = {id(stdout): sys.stdout, id(stderr): sys.stderr}
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.StreamHandler):
                continue
            target = redirected.get(id(handler.stream))
            if target is not None and target is not handler.stream:
                self._saved.append((handler, handler.stream))
                handler.setStream(target)

    def prefixed(self, prefix: str, out: Out) -> Waits:
        """The same display, for waits whose names start with ``prefix`` and whose lines
        go to ``out`` (``fedgate demo`` with several models)."""
        view = Waits(out)
        view.prefix, view.progress = prefix, self.progress
        return view

    @contextmanager
    def wait(
        self, what: str, timeout_s: float | None = None, steps: int | None = None
    ) -> Iterator[Wait]:
        """A wait for ``what``, giving up after ``timeout_s`` (shown as time left; the
        caller enforces it), counting ``steps`` when given."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        task = None
        if self.progress is not None:
            name = cell(self.prefix + what)
            task = self.progress.add_task(name, total=steps, state="", deadline=deadline)
        else:
            limit = "" if timeout_s is None else f" (up to {timeout_s:.0f}s)"
            self.out(f"  waiting for {what}{limit}")
        try:
            yield Wait(what, self.out, self.progress, task)
        finally:
            if self.progress is not None and task is not None:
                self.progress.remove_task(task)
