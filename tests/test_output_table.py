"""vmtrim.output's one table style, fitted to a terminal or whole in a pipe, and safe text."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from vmtrim.output import Column, Row, Styled, render_table, safe_text, set_quiet, shorten_middle

PATH = "/var/lib/libvirt/images/some/deep/folder/vm1-system-disk.qcow2"
COLUMNS = [
    Column("domain"),
    Column("source", shorten="middle", min_width=16),
    Column("bus", priority=2),
    Column("note", priority=1),
    Column("reclaimed", justify="right"),
]
VM1 = ["vm1", PATH, "scsi", "fine", "1.2 GiB"]
ROWS: list[list[str] | Row] = [
    VM1,
    Row(["vm2", "/dev/vg0/vm2", "virtio", "x", "0 B"], details=["the agent did not answer"]),
]


def render(width: int | None, rows: list[list[str] | Row] = ROWS, **kwargs: object) -> str:
    """The table as a terminal of ``width`` columns shows it, or a pipe (None)."""
    buffer = io.StringIO()
    out = Console(
        file=buffer,
        force_terminal=width is not None,
        width=width or 80,
        no_color=True,
        markup=False,
        highlight=False,
    )
    render_table(COLUMNS, rows, out=out, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def starts(line: str, cells: list[str]) -> list[int]:
    """Where each cell begins in ``line``, searching left to right."""
    found, at = [], 0
    for cell in cells:
        at = line.index(cell, at)
        found.append(at)
        at += len(cell)
    return found


def test_wide_terminal_shows_everything_aligned() -> None:
    header, vm1, vm2, detail = render(200).splitlines()
    left = ["domain", "source", "bus", "note"]
    assert (
        starts(header, left) == starts(vm1, VM1[:4]) == starts(vm2, ["vm2", "/dev", "virtio", "x"])
    )
    # Numbers are right-aligned: every row ends where the header does.
    assert len(header) == len(vm1) == len(vm2) and vm1.endswith(" 1.2 GiB")
    assert detail == "    the agent did not answer"


def test_narrow_terminal_shortens_the_path_in_the_middle_then_drops_columns() -> None:
    lines = render(60).splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].split() == ["domain", "source", "bus", "note", "reclaimed"]
    source = lines[1].split()[1]
    assert source.startswith("/var") and source.endswith("…/vm1-system-disk.qcow2")
    # 40 columns: the path is at its minimum, so note (priority 1) and bus (2) go.
    narrow = render(40).splitlines()
    assert narrow[0].split() == ["domain", "source", "reclaimed"]
    assert all(len(line) <= 40 for line in narrow)


def test_pipe_prints_whole_rows_however_long() -> None:
    text = render(None)
    assert f"vm1     {PATH}  scsi    fine    1.2 GiB\n" in text
    assert text == render(200)  # the natural width, never wrapped or fitted


@pytest.mark.parametrize("width", [None, 30, 200])
def test_untrusted_text_is_escaped_and_never_markup(width: int | None) -> None:
    hostile = "[b]x[/b] [/x] \x1b[2J\x1b]0;owned\x07\r\b\u202e\u2066 ok"
    rows: list[list[str] | Row] = [
        Row([hostile, hostile, "-", "-", Styled("[red]1[/red]", "red")], details=[hostile])
    ]
    text = render(width, rows, title=hostile, notes=[hostile])
    assert "\x1b" not in text and "\r" not in text and "\b" not in text and "\u202e" not in text
    if width != 30:  # at 30 columns the cells are cut; in full, the escapes read as typed
        escaped = "[b]x[/b] [/x] \\x1b[2J\\x1b]0;owned\\x07\\x0d\\x08\\u202e\\u2066 ok"
        assert text.count(escaped) == 5  # title, two cells, the detail and the note
        assert "[red]1[/red]" in text


def test_safe_text_escapes_every_control_and_keeps_the_rest() -> None:
    assert safe_text("tab\there\nnl\x7f\x85\u200f") == "tab\\x09here\\x0anl\\x7f\\x85\\u200f"
    assert safe_text("ünïcødé 日本 [b]") == "ünïcødé 日本 [b]"


@given(st.text())
def test_safe_text_output_is_printable_and_one_line(text: str) -> None:
    escaped = safe_text(text)
    assert not [ch for ch in escaped if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F]
    assert not {"\u202e", "\u2066", "\u2028"} & set(escaped)


@given(st.text(min_size=0, max_size=80), st.integers(min_value=1, max_value=60))
def test_shorten_middle_fits_and_keeps_both_ends(text: str, width: int) -> None:
    from rich.cells import cell_len

    short = shorten_middle(safe_text(text), width)
    assert cell_len(short) <= width
    if cell_len(safe_text(text)) <= width:
        assert short == safe_text(text)


def test_shorten_middle_keeps_the_file_name() -> None:
    short = shorten_middle(PATH, 32)
    assert len(short) == 32
    assert short.startswith("/var/lib") and short.endswith("…/vm1-system-disk.qcow2")


def test_quiet_hides_notes_not_rows() -> None:
    try:
        set_quiet(True)
        quiet = render(None, notes=["a note"])
    finally:
        set_quiet(False)
    assert quiet == render(None)
    assert render(None, notes=["a note"]) == render(None) + "a note\n"
