"""What an admin expects of the CLI: --version, --quiet, exit codes, a closed pipe, completion.

Every check runs the real ``vmtrim`` process: real pipes, a real SIGINT, the real
libvirtd of the test session for completion.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmtrim
from helpers import vmtrim as run_vmtrim

DATA = Path(__file__).parent / "data" / "audit"
ZOO = str(DATA / "zoo.xml")
VMTRIM = [sys.executable, "-m", "vmtrim"]


# ---------------------------------------------------------------- --version


def test_version_names_what_it_found() -> None:
    import libvirt

    done = run_vmtrim("--version")
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == f"vmtrim {vmtrim.__version__}"
    facts = Path(vmtrim.__file__).with_name("facts.py").read_bytes()
    assert lines[1].startswith(f"facts table {zlib.crc32(facts):08x} ")
    packed = libvirt.getVersion()  # the library libvirt-python loaded
    lib = f"{packed // 1000000}.{packed // 1000 % 1000}.{packed % 1000}"
    assert lines[2].startswith(f"libvirt {lib} (library /")
    banner = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout
    qemu = banner.split("QEMU emulator version ")[1].split()[0]
    assert lines[3].startswith(f"QEMU {qemu} (/")


def test_version_loads_neither_click_nor_rich() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vmtrim", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "vmtrim.cli.version" in modules
    assert not {m for m in modules if m.split(".")[0] in ("click", "rich", "subprocess")}


def test_version_after_other_options_says_the_same() -> None:
    assert run_vmtrim("--debug", "--version").stdout == run_vmtrim("--version").stdout


# ---------------------------------------------------------------- exit codes


def test_exit_codes_end_to_end(tmp_path: Path) -> None:
    assert (
        run_vmtrim(
            "audit", "--no-probe", "--qemu-args", str(DATA / "design-current.args")
        ).returncode
        == 0
    )
    assert run_vmtrim("audit", "--no-probe", "--xml", ZOO).returncode == 1  # findings
    missing = run_vmtrim("audit", "--xml", str(tmp_path / "nowhere.xml"))
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == f"vmtrim: {tmp_path / 'nowhere.xml'}: no such file\n"
    usage = run_vmtrim("audit", "--frobnicate")
    assert usage.returncode == 2 and "No such option" in usage.stderr
    uri = f"qemu+unix:///system?socket={tmp_path}/no-libvirt-sock"
    for command in ("audit", "trim", "fix"):
        dead = run_vmtrim(command, "-c", uri, "somedomain")
        assert dead.returncode == 3, (command, dead.stderr)
        assert dead.stderr.startswith(f"vmtrim: {uri}: cannot connect"), dead.stderr
        assert dead.stderr.count("\n") == 1


def test_interrupt_is_130_with_one_line(tmp_path: Path) -> None:
    # A QMP socket that accepts and never greets: audit waits for it until SIGINT.
    path = tmp_path / "silent.qmp"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    try:
        proc = subprocess.Popen(
            [*VMTRIM, "audit", "--qmp", str(path), "--timeout", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        conn, _ = server.accept()  # vmtrim is connected and waiting for the greeting
        try:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            conn.close()
    finally:
        server.close()
    assert proc.returncode == 130
    # click ends the ^C line with a newline first, as on a terminal.
    assert (out, err.lstrip("\n")) == ("", "vmtrim: interrupted\n")


def test_help_documents_every_exit_code() -> None:
    text = run_vmtrim("--help").stdout
    for code, word in (("0", "passes"), ("1", "findings"), ("2", "bad input"),
                       ("3", "environment"), ("4", "internal"), ("130", "interrupted"),
                       ("141", "pipe")):  # fmt: skip
        assert any(line.split()[:1] == [code] and word in line for line in text.splitlines())


# ---------------------------------------------------------------- a closed pipe


def test_audit_into_head_ends_quietly_with_141() -> None:
    # Enough output to fill the pipe: vmtrim is still writing when head exits.
    args = [a for _ in range(300) for a in ("--xml", ZOO)]
    audit = subprocess.Popen(
        [*VMTRIM, "audit", "--no-probe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert audit.stdout is not None and audit.stderr is not None
    head = subprocess.run(["head", "-1"], stdin=audit.stdout, capture_output=True, check=True)
    audit.stdout.close()
    err = audit.stderr.read()
    assert audit.wait() == 141
    assert err == b""  # no traceback, no "Exception ignored"
    assert head.stdout.split()[:2] == [b"domain", b"target"]


def test_json_into_head_ends_quietly_with_141() -> None:
    args = [a for _ in range(300) for a in ("--xml", ZOO)]
    done = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -1; echo "status=${PIPESTATUS[0]}" >&2', "_",
         *VMTRIM, "audit", "--no-probe", "--json", *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.stdout == "{\n"
    assert done.stderr == "status=141\n"


# ---------------------------------------------------------------- --quiet


def test_quiet_drops_notes_and_keeps_results() -> None:
    loud = run_vmtrim("audit", "--no-probe", "--xml", ZOO).stdout.splitlines()
    quiet = run_vmtrim("--quiet", "audit", "--no-probe", "--xml", ZOO)
    assert quiet.returncode == 1
    notes = [line for line in loud if line.startswith("note: ")]
    assert notes  # zoo has a hostdev, which audit notes and skips
    assert quiet.stdout.splitlines() == [line for line in loud if line not in notes]


# ---------------------------------------------------------------- completion


def complete(words: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """What bash gets on TAB after ``words`` (click's bash_complete protocol)."""
    parts = words.split(" ")
    return subprocess.run(
        [sys.executable, "-m", "vmtrim"],
        env={
            **os.environ,
            **(env or {}),
            "_VMTRIM_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(parts) - 1),
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def names(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if line]


@pytest.fixture
def defined_domain(libvirtd: str) -> Iterator[str]:
    """A domain defined on the real libvirtd, never started."""
    import libvirt

    name = f"vmtrim-compl-{os.getpid()}"
    xml = (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
        "<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
    )
    conn = libvirt.open(libvirtd)
    dom = conn.defineXML(xml)
    try:
        yield name
    finally:
        dom.undefine()
        conn.close()


@pytest.mark.libvirt
def test_domain_arguments_complete_from_the_connection(libvirtd: str, defined_domain: str) -> None:
    prefix = defined_domain[:-2]
    for command in ("audit", "trim", "fix"):
        got = names(complete(f"vmtrim {command} -c {libvirtd} {prefix}"))
        assert got == [defined_domain], command
    # The URI from the environment, and a name already on the line is not offered again.
    env = {"LIBVIRT_DEFAULT_URI": libvirtd}
    assert defined_domain in names(complete("vmtrim audit ", env))
    assert defined_domain not in names(complete(f"vmtrim audit {defined_domain} ", env))
    assert names(complete(f"vmtrim audit -c {libvirtd} zzz-no-such")) == []


def test_completion_fails_silently_without_a_daemon(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/no-sock"
    assert names(complete(f"vmtrim audit -c {uri} ")) == []
    assert names(complete("vmtrim trim ", {"LIBVIRT_DEFAULT_URI": uri})) == []


def test_completion_script_is_documented_and_sources() -> None:
    script = subprocess.run(
        [*VMTRIM], env={**os.environ, "_VMTRIM_COMPLETE": "bash_source"},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "complete " in script and "_VMTRIM_COMPLETE=bash_complete" in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, check=False)
    assert checked.returncode == 0
    assert "_VMTRIM_COMPLETE=bash_source vmtrim" in run_vmtrim("--help").stdout


def test_error_lines_escape_the_name_the_user_gave(tmp_path: Path) -> None:
    name = tmp_path / "\x1b[2Jevil[/x]\r.xml"
    done = run_vmtrim("audit", "--xml", str(name))
    assert done.returncode == 2
    assert done.stderr == f"vmtrim: {tmp_path}/\\x1b[2Jevil[/x]\\x0d.xml: no such file\n"


def test_fix_in_place_prints_hostile_names_after_the_write(tmp_path: Path) -> None:
    # Whatever prints after the write must not fail on the names it prints: the user
    # would be told the fix failed although it was applied.
    path = tmp_path / "evil.xml"
    path.write_text(
        "<domain type='kvm'><name>[b]x[/b][/x]</name><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        "<source file='/tmp/[/x]a.img'/><target dev='[/x]' bus='virtio'/><shareable/></disk>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/tmp/[red]b.img'/><target dev='vdb' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    done = run_vmtrim("fix", "--xml", str(path), "--in-place")
    assert done.returncode == 0, done.stderr
    assert "discard='unmap'" in path.read_text()
    assert "left alone: [/x]: shareable" in done.stderr  # as typed, not as markup
    assert f"wrote {path}" in done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
