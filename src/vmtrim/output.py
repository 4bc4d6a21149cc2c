"""Rendering shared by the commands: one table style, safe text, JSON documents, sizes.

Every human table in vmtrim (audit, fix, trim, image, verify) goes through
:func:`render_table`, so they all look the same: a header line and one line per row,
columns separated by two spaces, no box (the style of ``virsh list`` and ``ps``)::

    from vmtrim.output import Column, Row, Styled, render_table

    render_table(
        [
            Column("domain"),
            Column("source", shorten="middle"),     # /var/lib/libvirt/…/vm1.qcow2
            Column("bus", priority=2),              # dropped first on a narrow terminal
            Column("reclaimed", justify="right"),
        ],
        [
            ["vm1", "/var/lib/libvirt/images/vm1.qcow2", "scsi", "1.2 GiB"],
            Row(["vm2", "/dev/vg0/vm2", "virtio", Styled("-", "yellow")],
                details=["the agent did not answer"]),   # lines below the row
        ],
        title="vmtrim trim",                         # optional line above
        notes=["guest says: an upper bound"],        # below; hidden by --quiet
    )

Layout rules:

* **On a terminal** the table fits the terminal width: columns with
  ``shorten="middle"`` (paths) or ``shorten="end"`` are shortened first, down to
  ``min_width``; then columns are dropped, highest ``priority`` number first
  (priority 0, the default, is never dropped); if a row is still too wide, it is
  cut at the edge with ``…``. Rows never wrap. Details and notes wrap, indented.
  The full values are always in ``--json``.
* **Off a terminal** (a pipe, a file, cron) nothing is fitted, shortened or
  wrapped: one line per row at its natural width, so ``grep`` and ``awk`` see whole
  values. There is no colour off a terminal, nor with ``NO_COLOR`` set (then no
  bold either: the text is exactly what a pipe would get, only fitted).

Text safety: cells, titles, details and notes are **untrusted plain text** (guest
fstrim paths and errors, QMP node names, ``-name``/``file=`` values). They are never
read as rich markup (``[b]x[/b]`` and a lone ``[/x]`` print as typed), and
:func:`safe_text` turns control characters into visible escapes: C0 and C1 controls
(ESC, CR, BS, TAB, NL...), DEL and the Unicode bidi/line controls (U+202A-U+202E,
U+2066-U+2069, U+200E/U+200F, U+061C, U+2028/U+2029) print as ``\\x1b``,
``\\u202e`` and the like. Use :func:`print_line` (or :func:`safe_text` with
``markup=False``) for single lines outside tables; nothing here can raise on what
the text contains.

``--quiet`` (:func:`set_quiet`) hides notes (:func:`print_note`, ``notes=``) and
progress (:func:`progress_console` returns a console that prints nothing); results,
tables and errors stay.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # rich is imported lazily: `vmtrim image info --json` never needs it
    from rich.console import Console
    from rich.text import Text

__all__ = [
    "Cell",
    "Column",
    "Row",
    "Styled",
    "color_allowed",
    "console",
    "human_bytes",
    "is_quiet",
    "json_document",
    "print_json",
    "print_line",
    "print_note",
    "progress_console",
    "render_table",
    "safe_text",
    "set_quiet",
    "shorten_middle",
    "write_stdout",
]


def json_document(schema: str, body: dict[str, Any]) -> dict[str, Any]:
    """Return ``body`` with the ``"schema": "vmtrim.<command>/<n>"`` field first."""
    return {"schema": schema, **body}


def print_json(schema: str, body: dict[str, Any]) -> None:
    write_stdout(json.dumps(json_document(schema, body), indent=2, sort_keys=False) + "\n")


def write_stdout(text: str) -> None:
    """Write ``text`` whole, or raise BrokenPipeError when the reader has gone.

    A large ``sys.stdout.write`` to a pipe whose reader exits mid-write can end with a
    short write that Python does not report, and the run would then claim success.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured (pytest, StringIO)
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    data = memoryview(text.encode(sys.stdout.encoding or "utf-8", errors="replace"))
    while data:
        data = data[os.write(fd, data) :]


# --- quiet -------------------------------------------------------------------------

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """``vmtrim --quiet``: no progress, no notes; results and errors still print."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


# --- safe text -----------------------------------------------------------------------

# C0 (tab and newline too: a cell is one line), DEL, C1, and the Unicode controls that
# reorder or break lines (bidi embeddings/overrides/isolates, marks, separators).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: object) -> str:
    """``value`` as one printable line: control characters become ``\\x1b``-style escapes.

    The result is plain text; print it with ``markup=False`` (or :func:`print_line`).
    """
    return _UNSAFE.sub(_escape, str(value))


# --- consoles ------------------------------------------------------------------------


def color_allowed(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich would exit 1 ("findings"); vmtrim.cli.run turns this into exit 141.
            self.quiet = True
            raise BrokenPipeError

    return _Console


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); markup and highlighting are off.

    A closed pipe raises BrokenPipeError (rich itself would exit 1).
    """
    stream = sys.stderr if stderr else sys.stdout
    out = _console_class()(
        file=stream,
        no_color=not color_allowed(stream),
        highlight=False,
        markup=False,
        emoji=False,
    )
    # Off a terminal nothing wraps: a pipe has no width (rich would assume 80).
    out.soft_wrap = not out.is_terminal
    return out


def progress_console() -> Console:
    """The console for progress bars and spinners: stderr, or nowhere with ``--quiet``."""

    if _quiet:
        return _console_class()(file=sys.stderr, quiet=True)
    return console(stderr=True)


def print_line(text: object, *, style: str | None = None, err: bool = False) -> None:
    """Print one line of untrusted text, escaped, never read as markup."""
    out = console(stderr=err)
    limit = out.width if out.is_terminal else None
    _print_lines(out, _wrapped(out, "", safe_text(text), style if _styled(out) else None, limit))


def print_note(text: object, *, err: bool = False) -> None:
    """A note: like :func:`print_line`, dimmed, and hidden by ``--quiet``."""
    if not _quiet:
        print_line(text, style="dim", err=err)


def _styled(out: Console) -> bool:
    # NO_COLOR or a pipe: no escape sequences at all, not even bold.
    return out.is_terminal and not out.no_color


def _text(plain: str, style: str | None = None) -> Text:
    from rich.text import Text

    return Text(plain, style=style or "")


# --- tables --------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A table column.

    ``priority`` 0 is never dropped; on a narrow terminal, higher numbers go first.
    ``shorten`` says how a too-wide cell is cut to fit: ``"middle"`` keeps both ends
    (paths: ``/var/lib/libvirt/…/vm1.qcow2``), ``"end"`` keeps the start.
    """

    header: str
    justify: Literal["left", "right"] = "left"
    priority: int = 0
    shorten: Literal["middle", "end"] | None = None
    min_width: int = 12
    style: str | None = None


@dataclass(frozen=True)
class Styled:
    """A cell with a style (colour only on a colour terminal)."""

    text: str
    style: str | None = None


Cell = str | Styled | None  # what a table cell or detail line can be


@dataclass(frozen=True)
class Row:
    """A row with lines printed below it (findings, errors), indented, across the table."""

    cells: Sequence[Cell]
    details: Sequence[Cell] = field(default_factory=tuple)


_GAP = 2
_ELLIPSIS = "…"


def _cell(value: Cell) -> tuple[str, str | None]:
    if isinstance(value, Styled):
        return safe_text(value.text), value.style
    return ("" if value is None else safe_text(value)), None


def shorten_middle(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` cells with ``…`` in the middle, keeping the file name."""
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    budget = width - 1
    name = text.rsplit("/", 1)[-1]
    # The tail (the file name, with its slash) matters most; the head shows where it is.
    tail_len = max(budget // 2, min(cell_len(name) + 1, budget - min(4, budget // 3)))
    tail = _fit_end(text, tail_len, from_end=True)
    head = _fit_end(text, budget - cell_len(tail), from_end=False)
    return head + _ELLIPSIS + tail


def _shorten_end(text: str, width: int) -> str:
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    return _fit_end(text, max(width - 1, 0), from_end=False) + _ELLIPSIS[: max(width, 0)]


def _fit_end(text: str, width: int, *, from_end: bool) -> str:
    """The longest prefix (or suffix) of ``text`` that fits in ``width`` cells."""
    from rich.cells import cell_len

    chars = reversed(text) if from_end else iter(text)
    taken: list[str] = []
    used = 0
    for ch in chars:
        w = cell_len(ch)
        if used + w > width:
            break
        taken.append(ch)
        used += w
    return "".join(reversed(taken)) if from_end else "".join(taken)


def _layout(columns: Sequence[Column], natural: list[int], limit: int | None) -> list[int | None]:
    """Each column's width, or None for a dropped column, so the table fits ``limit``."""
    widths: list[int | None] = list(natural)
    if limit is None:
        return widths
    while True:
        shown = [i for i, w in enumerate(widths) if w is not None]
        excess = sum(natural[i] for i in shown) + _GAP * (len(shown) - 1) - limit
        if excess <= 0:
            return widths
        # Shorten the widest shortenable cells first, down to their minimum.
        current = {i: natural[i] for i in shown}
        while excess > 0:
            candidates = [
                i
                for i in shown
                if columns[i].shorten
                and current[i] > max(columns[i].min_width, len(columns[i].header))
            ]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: current[i])
            floor = max(columns[widest].min_width, len(columns[widest].header))
            others = [current[i] for i in candidates if i != widest]
            step = min(excess, current[widest] - max(floor, max(others, default=floor)) or 1)
            current[widest] -= step
            excess -= step
        if excess <= 0:
            return [current.get(i) for i in range(len(widths))]
        droppable = [i for i in shown if columns[i].priority > 0]
        if not droppable:
            return [current.get(i) for i in range(len(widths))]
        widths[max(droppable, key=lambda i: (columns[i].priority, i))] = None


def render_table(
    columns: Sequence[Column],
    rows: Iterable[Sequence[Cell] | Row],
    *,
    title: str | None = None,
    notes: Iterable[str] = (),
    show_header: bool = True,
    out: Console | None = None,
    stderr: bool = False,
) -> None:
    """Print a table in vmtrim's one style (see the module docstring for the rules)."""
    from rich.cells import cell_len
    from rich.text import Text

    out = out or console(stderr=stderr)
    styled = _styled(out)
    table: list[tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]] = []
    for row in rows:
        cells, details = (row.cells, row.details) if isinstance(row, Row) else (row, ())
        if len(cells) != len(columns):
            raise ValueError(f"row has {len(cells)} cells for {len(columns)} columns")
        table.append(([_cell(c) for c in cells], [_cell(d) for d in details]))
    natural = [
        max([cell_len(col.header) if show_header else 0] + [cell_len(r[0][i][0]) for r in table])
        for i, col in enumerate(columns)
    ]
    limit = out.width if out.is_terminal else None
    widths = _layout(columns, natural, limit)

    def line(cells: list[tuple[str, str | None]], bold: bool) -> Text:
        text = Text(no_wrap=True, overflow="ignore" if limit is None else "ellipsis")
        shown = [(i, w) for i, w in enumerate(widths) if w is not None]
        for n, (i, width) in enumerate(shown):
            plain, style = cells[i]
            col = columns[i]
            if cell_len(plain) > width:
                plain = (
                    shorten_middle(plain, width)
                    if col.shorten == "middle"
                    else _shorten_end(plain, width)
                )
            pad = " " * (width - cell_len(plain))
            last = n == len(shown) - 1
            if col.justify == "right":
                text.append(pad)
            style = style or col.style
            text.append(plain, style=("bold" if bold else style) if styled else None)
            if col.justify == "left" and not last:
                text.append(pad)
            if not last:
                text.append(" " * _GAP)
        text.rstrip()
        return text

    lines: list[Text] = []
    if title is not None:
        lines.append(_text(safe_text(title), "bold" if styled else None))
    if show_header and table:
        lines.append(line([(c.header, None) for c in columns], bold=True))
    for rendered, below in table:
        lines.append(line(rendered, bold=False))
        for plain, style in below:
            lines += _wrapped(out, "    ", plain, style if styled else None, limit)
    if not _quiet:
        for note in notes:
            lines += _wrapped(out, "", safe_text(note), "dim" if styled else None, limit)
    _print_lines(out, lines)


def _print_lines(out: Console, lines: list[Text]) -> None:
    from rich.text import Text

    if not lines:
        return
    if not out.is_terminal:
        # Off a terminal there is no style to render: plain lines, written whole.
        plain = "".join(line.plain + "\n" for line in lines)
        if out.file is sys.stdout:
            write_stdout(plain)
        else:
            out.file.write(plain)
            out.file.flush()
        return
    # One print for the whole table: a print per line costs seconds on 1,000 domains.
    out.print(Text("\n").join(lines), crop=True, no_wrap=True, overflow="ellipsis")


def _wrapped(
    out: Console, indent: str, plain: str, style: str | None, limit: int | None
) -> list[Text]:
    """A sentence below a row: wrapped with a hanging indent on a terminal, one line off it."""
    from rich.text import Text

    if limit is None:
        return [Text(indent + plain, style=style or "")]
    # Continuation lines hang two cells further in, past the line's mark.
    width = max(limit - len(indent) - 2, 10)
    parts = Text(plain, style=style or "").wrap(out, width)
    lines = []
    for n, part in enumerate(parts):
        part.rstrip()
        lines.append(Text(indent if n == 0 else indent + "  ") + part)
    return lines


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'. Exact bytes belong in JSON; this is for tables."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
