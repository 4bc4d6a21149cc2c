"""audit's human table as a user sees it: golden text at 80 and 200 columns and piped.

The terminal runs are a real `vmtrim audit` process told it is on a terminal the way
rich honours it (``TTY_COMPATIBLE=1``, ``COLUMNS``); one more run is on a real pty of
80 columns and must print the same text. ``NO_COLOR`` keeps escape sequences out, so
the golden files are the plain text: ``zoo.xml.audit.80col.txt`` and ``.200col.txt``
beside the input, and the piped ``zoo.xml.audit.txt`` that test_golden_audit.py
also checks. Regenerate with ``pytest --regenerate-output`` (see conftest.py).
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from helpers import assert_golden

DATA = Path(__file__).parent / "data" / "audit"
INPUT = ["audit", "--no-probe", "--xml", str(DATA / "zoo.xml")]


def golden(suffix: str) -> Path:
    return DATA / f"zoo.xml.audit{suffix}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COLUMNS", "LINES", "TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR")
    }
    return {**env, **extra}


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmtrim", *INPUT],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("columns", [80, 200])
def test_table_fits_the_terminal(columns: int) -> None:
    proc = run(clean_env(COLUMNS=str(columns), TTY_COMPATIBLE="1", NO_COLOR="1"))
    assert proc.returncode == 1, proc.stderr  # zoo has blocking disks
    assert "\x1b" not in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= columns
    assert_golden(proc.stdout, golden(f".{columns}col.txt"))


def test_table_piped_is_one_unwrapped_line_per_row() -> None:
    proc = run(clean_env(NO_COLOR="1"))
    assert proc.returncode == 1, proc.stderr
    assert_golden(proc.stdout, golden(".txt"))
    lines = proc.stdout.splitlines()
    # The full path, on the row of its disk, however long the line gets.
    row = next(line for line in lines if line.split()[:2] == ["zoo", "sdb"])
    assert "iscsi://iscsi.example:3260/iqn.2013-07.com.example:iscsi-nopool/1" in row
    assert len(row) > 80


def read_pty(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_real_terminal_of_80_columns_prints_the_golden_text() -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 80, 0, 0))
    attrs = termios.tcgetattr(follower)
    attrs[1] &= ~termios.ONLCR  # plain "\n" line ends, as in the golden file
    termios.tcsetattr(follower, termios.TCSANOW, attrs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", *INPUT],
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env=clean_env(NO_COLOR="1"),
    )
    os.close(follower)
    try:
        output = read_pty(leader).decode()
    finally:
        os.close(leader)
        code = proc.wait()
    assert code == 1
    assert_golden(output, golden(".80col.txt"))


def test_unknown_reasons_are_printed() -> None:
    lines = run(clean_env()).stdout.splitlines()
    # A reason one disk has is printed below its row ...
    vdd = lines.index(next(line for line in lines if line.split()[:2] == ["zoo", "vdd"]))
    below = lines[vdd + 1 : vdd + 3]
    assert any(
        "? host_storage: unknown: storage pool volume default/zoo-vol.qcow2" in x for x in below
    )
    # ... and one that many disks share, once, naming them.
    shared = [line for line in lines if line.startswith("? guest_fs: unknown on zoo (vda, vdb")]
    assert len(shared) == 1 and "no guest information" in shared[0]


def test_hostile_names_are_escaped_and_never_markup(tmp_path: Path) -> None:
    args = tmp_path / "evil.args"
    # -name clears the screen and carries unbalanced markup; the path has a bidi override.
    argv = [
        "qemu-system-x86_64",
        "-name",
        "\x1b[2J\r[/x][b]forged",
        "-drive",
        "file=/tmp/\x1b[31mred\u202e.img,if=virtio,format=raw",
    ]
    args.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for env in (clean_env(), clean_env(COLUMNS="80", TTY_COMPATIBLE="1")):
        proc = subprocess.run(
            [sys.executable, "-m", "vmtrim", "audit", "--no-probe", "--qemu-args", str(args)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == ""
        if "TTY_COMPATIBLE" in env:  # colour codes, and a shortened name, but no raw text
            assert "\x1b[2J" not in proc.stdout and "\x1b[31mred" not in proc.stdout
            assert "\\x1b[2J" in proc.stdout
        else:
            row = proc.stdout.splitlines()[1]
            assert row.startswith("\\x1b[2J\\x0d[/x][b]forged  virtio0")
            assert "/tmp/\\x1b[31mred\\u202e.img" in proc.stdout
            assert "\x1b" not in proc.stdout
        assert "\r" not in proc.stdout and "\u202e" not in proc.stdout
