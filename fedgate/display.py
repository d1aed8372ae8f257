"""The CLI's tables: rich tables, drawn for a terminal or as plain, stable text.

On a terminal (:func:`is_terminal`) a table has a bold header over a heavy rule, states
in colour (``ok``, ``promoted`` green; ``held`` yellow; ``ejected``, ``failed`` red) and
wraps to the terminal's width. Anywhere else (a pipe, CI, a test) it is plain text that a
script can split on whitespace, the same whatever the width: no colour and no escape
codes, the header, a rule of dashes under each column, one line per row, columns two
spaces apart, numbers right-aligned, ``-`` for nothing, nothing wrapped or cut.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

PLAIN_BOX = box.Box(
    "    \n"  # top (not drawn: no edge)
    "    \n"  # header row: columns separated by a space
    " -  \n"  # under the header: a rule of dashes per column
    "    \n"
    "    \n"
    "    \n"
    "    \n"
    "    \n",
    ascii=True,
)
"""No lines but the header's rule of dashes."""

PLAIN_WIDTH = 100_000
"""A plain table is never wrapped: its console is this wide, and lines are stripped."""

STYLES = {
    "ok": "green",
    "running": "green",
    "released": "green",
    "promoted": "green",
    "pending": "cyan",
    "staging": "cyan",
    "canary": "cyan",
    "restarting": "yellow",
    "held": "yellow",
    "stopped": "yellow",
    "ejected": "red",
    "failed": "red",
    "rolled_back": "red",
}
"""The colour of a cell on a terminal, by its first word."""


def is_terminal() -> bool:
    """True when standard output is a terminal (or rich is told so: ``FORCE_COLOR``,
    ``TTY_COMPATIBLE``); tables and progress are then drawn for it."""
    return Console().is_terminal


def cell(value: object) -> str:
    """A value as a table shows it: ``None`` as ``-``, floats with 3 decimals, and no
    control characters (a gateway's text cannot move a terminal's cursor)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))


def build_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    fancy: bool = False,
    right: Collection[str] = (),
) -> Table:
    """A rich table of ``rows``. A column is right-aligned when every value in it is a
    number or ``None``, or when its header is in ``right``."""
    numeric = [
        headers[i] in right
        or (bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows))
        for i in range(len(headers))
    ]
    if fancy:
        table = Table(box=box.SIMPLE_HEAVY, show_edge=False, header_style="bold", pad_edge=False)
    else:  # two spaces between columns: one of padding, one of divider
        table = Table(box=PLAIN_BOX, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
    for header, num in zip(headers, numeric, strict=True):
        table.add_column(Text(header), justify="right" if num else "left", no_wrap=not fancy)
    for row in rows:
        texts = [cell(v) for v in row]
        styles = [STYLES.get(t.split(" ", 1)[0], "") if fancy else "" for t in texts]
        table.add_row(*(Text(t, style=s) for t, s in zip(texts, styles, strict=True)))
    return table


def render(renderable: RenderableType, *, fancy: bool = False, margin: int = 0) -> list[str]:
    """The lines of ``renderable``: with colour codes, for this terminal's width less
    ``margin`` (the caller's indent) when ``fancy``; else plain and unwrapped."""
    buffer = io.StringIO()
    if fancy:
        width = max(20, Console().width - margin)
        console = Console(file=buffer, force_terminal=True, width=width)
    else:
        console = Console(file=buffer, width=PLAIN_WIDTH, color_system=None, no_color=True)
    console.print(renderable, highlight=False, markup=False, emoji=False)
    return [line.rstrip() for line in buffer.getvalue().splitlines()]


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    fancy: bool = False,
    right: Collection[str] = (),
    margin: int = 0,
) -> list[str]:
    """:func:`build_table`, rendered (:func:`render`)."""
    return render(build_table(headers, rows, fancy=fancy, right=right), fancy=fancy, margin=margin)
