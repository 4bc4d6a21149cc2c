"""The trim table as a user sees it: golden text at 80 and 200 columns, and piped.

The results are built here (the renderer is under test, not the trim); they hold
what guests really send: a long image path, a failed path, an agent that did not
answer, a no_effect domain with the audit's blocking layer, and a guest whose
fstrim path carries escape sequences and rich markup. rich is told it is on a
terminal the way it honours it (``TTY_COMPATIBLE=1``, ``COLUMNS``); ``NO_COLOR``
keeps escape sequences out, so the golden files are plain text. Regenerate with
``pytest tests/test_trim_table.py --regenerate-output`` and review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_golden
from vmtrim.channels.qmp import FstrimPath
from vmtrim.cli.trim import render
from vmtrim.trim.engine import Blocker, DiskResult, TrimResult

DATA = Path(__file__).parent / "data" / "trim"
MiB = 1024 * 1024
GiB = 1024 * MiB


def results() -> list[TrimResult]:
    long_path = "/var/lib/libvirt/images/customers/eu-west/production/web-frontend-01-root.qcow2"
    return [
        TrimResult(
            "web-frontend-01",
            paths=[FstrimPath("/", trimmed=812 * MiB), FstrimPath("/boot", trimmed=0)],
            disks=[
                DiskResult("vda", long_path, 9 * 1024 * MiB, 8 * 1024 * MiB + 300 * MiB, "du"),
                DiskResult("vdb", "/dev/vg0/web-data", 40 * GiB, 40 * GiB, "blockInfo"),
            ],
            seconds=3.21,
        ),
        TrimResult(
            "db-02",
            status="no_effect",
            reason="the host got back 0 B of the 973.4 MiB the guest trimmed: ...",
            paths=[FstrimPath("/var/lib/postgresql", trimmed=973 * MiB)],
            disks=[DiskResult("sda", "/var/lib/libvirt/db-02.qcow2", 20 * MiB, 20 * MiB, "du")],
            blockers=[
                Blocker(
                    "sda",
                    "block_node",
                    "qcow2 node has discard=ignore (the default): guest discards are dropped",
                    "add discard='unmap' to <driver>",
                    "vmtrim fix -c qemu:///system db-02",
                )
            ],
            seconds=1.5,
        ),
        TrimResult("hung-03", status="skipped", reason="hung-03: guest agent: no answer in 60 s",
                   seconds=60.0),
        TrimResult(
            "evil\x1b[2J-04",
            status="failed",
            reason="/mnt\x1b[H[b]forged[/b]: FITRIM: not supported [/x]",
            paths=[FstrimPath("/mnt\x1b[H[b]forged[/b]", error="FITRIM: not supported [/x]")],
            seconds=0.4,
        ),
    ]  # fmt: skip


@pytest.mark.parametrize("columns", [80, 200])
def test_table_fits_the_terminal(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    render(results(), ["old-vm"])
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert max(len(line) for line in out.splitlines()) <= columns
    assert_golden(out, DATA / f"table-{columns}.txt")


def test_table_piped_is_one_line_per_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("COLUMNS", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    render(results())
    out = capsys.readouterr().out
    assert "\x1b" not in out
    # Whole values for grep and awk: the full path, the unshortened status, row by row.
    rows = [line for line in out.splitlines() if line.startswith(("web-", "db-02", "hung", "evil"))]
    assert [r.split()[:2] for r in rows] == [
        ["web-frontend-01", "trimmed"],
        ["db-02", "no_effect"],
        ["hung-03", "skipped"],
        ["evil\\x1b[2J-04", "failed"],
    ]
    assert "/var/lib/libvirt/images/customers/eu-west/production/web-frontend-01-root.qcow2" in out
    assert "[b]forged[/b]" in out  # printed as typed, never read as markup
    assert_golden(out, DATA / "table-piped.txt")
