"""`vmtrim image info|map` human tables: the shared style, fitted on a terminal, whole when
piped, hostile file names escaped; the modules `image info` loads; and its click-free
fast path, which must print what click's parse prints, byte for byte."""

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

from helpers import qemu_img
from image_support import create, qemu_io
from test_cli_audit_table import read_pty

VMTRIM = [sys.executable, "-m", "vmtrim"]


@pytest.fixture(scope="module")
def long_named(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / ("deep-directory-name-" * 4).rstrip("-")
    d.mkdir()
    base = create(d / "base-of-the-chain.qcow2", "4M")
    qemu_io(base, "write -P 1 0 64k", "write -P 2 1M 64k")
    top = d / "top-layer-with-a-long-name.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "4M")
    qemu_io(top, "write -P 3 2M 64k")
    return top


def _on_pty(args: list[str], columns: int) -> str:
    """Run with stdout on a pseudo-terminal of ``columns`` columns; return what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["NO_COLOR"] = "1"
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    shown = read_pty(master)
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    return shown.decode().replace("\r\n", "\n")


@pytest.mark.parametrize("command", ["info", "map"])
def test_tables_fit_an_80_column_terminal(long_named: Path, command: str) -> None:
    shown = _on_pty([*VMTRIM, "image", command, str(long_named)], 80)
    lines = shown.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), shown
    if command == "map":
        # paths are shortened in the middle: where it is, and the file's own name
        rows = [line for line in lines if line.lstrip().startswith("0x")]
        assert rows and all("…" in row and row.endswith(".qcow2") for row in rows)


@pytest.mark.parametrize("command", ["info", "map"])
def test_piped_tables_are_one_whole_line_per_row(long_named: Path, command: str) -> None:
    out = subprocess.run(
        [*VMTRIM, "image", command, str(long_named)], check=True, capture_output=True, text=True
    ).stdout
    assert "…" not in out
    if command == "map":
        rows = [line for line in out.splitlines() if line.lstrip().startswith("0x")]
        theirs = qemu_img("map", long_named).stdout.splitlines()[1:]
        assert len(rows) == len(theirs) == 3
        assert {row.split()[-1] for row in rows} == {line.split()[-1] for line in theirs}
    else:
        assert f"{long_named.parent}/base-of-the-chain.qcow2 (backing depth 1)" in out


def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    evil = tmp_path / "x\x1b[2J\x1b[Hforged\rrow.qcow2"
    create(evil, "1M")
    for args in (["info"], ["map"]):
        piped = subprocess.run(
            [*VMTRIM, "image", *args, str(evil)], check=True, capture_output=True, text=True
        ).stdout
        shown = _on_pty([*VMTRIM, "image", *args, str(evil)], 200)
        for out in (piped, shown.replace("\n", "")):
            assert "\x1b" not in out and "\r" not in out
            assert "\\x1b[2J" in out


FORBIDDEN = (
    "lxml",
    "rich",
    "libvirt",
    "libvirtmod",
    "qemu",
    "click",
    "click_extra",
    "pygments",
    "yaml",
)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_image_info_json_imports_only_what_it_needs(tmp_path: Path, fmt: str) -> None:
    img = create(tmp_path / f"disk.{fmt}", "4M", fmt)
    proc = subprocess.run(
        [*VMTRIM[:1], "-X", "importtime", *VMTRIM[1:], "image", "info", "--json", str(img)],
        check=True,
        capture_output=True,
        text=True,
    )
    modules = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "imported package" not in line
    }
    tops = {m.split(".")[0] for m in modules}
    assert not tops & set(FORBIDDEN), sorted(tops & set(FORBIDDEN))
    ours = {m for m in modules if m.startswith("vmtrim.")}
    allowed = ("vmtrim.cli", "vmtrim.errors", "vmtrim._util", "vmtrim.image", "vmtrim.output")
    assert all(m.startswith(allowed) for m in ours), sorted(ours)
    # the fast path: neither the click group nor the click command module
    assert not ours & {"vmtrim.cli.group", "vmtrim.cli.image"}, sorted(ours)
    # the audit, trim and fix machinery stay out of a read-only image command
    assert not {m for m in ours if m.startswith(("vmtrim.audit", "vmtrim.channels"))}


# Run one argv the way the console script does, parsing with click whatever the argv.
CLICK_ONLY = "import sys; from vmtrim.cli import run; sys.exit(run(sys.argv[1:], fast=False))"


@pytest.fixture(scope="module")
def argv_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fast")
    pool = d / "pool"
    pool.mkdir()
    base = create(pool / "base.qcow2", "4M")
    qemu_io(base, "write -P 1 0 64k", "write -z 1M 64k")
    top = pool / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "4M")
    raw = create(pool / "disk.raw", "1M", "raw")
    qemu_io(raw, "write -P 0 0 64k", "write -P 5 128k 4k", fmt="raw")
    junk = d / "notes.txt"
    junk.write_text("not an image\n")
    evil = create(d / "x\x1b[2Jforged\rrow \udcff.qcow2", "1M")
    return {
        "top": str(top),
        "raw": str(raw),
        "pool": str(pool),
        "junk": str(junk),
        "evil": str(evil),
        "missing": str(d / "missing.qcow2"),
    }


FAST_ARGVS = [
    ["{top}"],
    ["--json", "{top}"],
    ["{top}", "--json", "--no-backing"],
    ["--json", "--json", "{top}"],
    ["--scan-zeros", "{raw}"],
    ["--scan-zeros", "--json", "{top}"],
    ["--json", "{top}", "{raw}"],
    ["{pool}"],
    ["--json", "{pool}", "{junk}"],
    ["{missing}"],
    ["--json", "{junk}"],
    ["{evil}"],
    [""],
]
CLICK_ARGVS = [
    [],
    ["--json"],
    ["--bogus", "{top}"],
    ["--json=1", "{top}"],
    ["-f", "raw", "{raw}"],
    ["--format=qcow2", "--json", "{top}"],
    ["-f", "vmdk", "{top}"],
    ["--", "{top}"],
    ["-", "{top}"],
    ["--help"],
    ["-h", "{top}"],
    ["{top}", "--no-such"],
]


@pytest.mark.parametrize("argv", FAST_ARGVS + CLICK_ARGVS, ids=" ".join)
def test_fast_path_prints_what_click_prints(argv_images: dict[str, str], argv: list[str]) -> None:
    from vmtrim.cli.image_info import fast_args

    args = ["image", "info", *(a.format(**argv_images) for a in argv)]
    # the fast path takes exactly the first set; the second is click's to parse or refuse
    assert (fast_args(args[2:]) is not None) == (argv in FAST_ARGVS)
    env = {**os.environ, "COLUMNS": "100"}
    fast, slow = (
        subprocess.run(cmd + args, capture_output=True, env=env, timeout=120, check=False)
        for cmd in (VMTRIM, [sys.executable, "-c", CLICK_ONLY])
    )
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        slow.returncode,
        slow.stdout,
        slow.stderr,
    )
    assert b"Traceback" not in fast.stderr


def test_image_info_options_are_the_declared_ones() -> None:
    """click's command is built from image_info.OPTIONS: the fast path reads the same list."""
    from vmtrim.cli.image import info
    from vmtrim.cli.image_info import OPTIONS

    params = [p for p in info.params if p.name != "paths"]
    assert [(tuple(p.opts), p.name) for p in params] == [(o.decls, o.dest) for o in OPTIONS]


@pytest.mark.parametrize("fast", [True, False])
def test_a_closed_pipe_exits_141_either_way(argv_images: dict[str, str], fast: bool) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    code = CLICK_ONLY.replace("fast=False", f"fast={fast}")
    args = ["image", "info", "--json", argv_images["top"]]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        stdout=write_end,
        stderr=subprocess.PIPE,
        timeout=120,
        check=False,
    )
    os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, b"")


def test_shell_completion_is_clicks_even_for_image_info(argv_images: dict[str, str]) -> None:
    env = {
        **os.environ,
        "_VMTRIM_COMPLETE": "bash_complete",
        "COMP_WORDS": f"vmtrim image info {argv_images['top']} --no",
        "COMP_CWORD": "4",
    }
    args = ["image", "info", argv_images["top"], "--no"]
    proc = subprocess.run([*VMTRIM, *args], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--no-backing" in proc.stdout
