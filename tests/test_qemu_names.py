"""One name per disk: the name `vmtrim audit` prints is the name `vmtrim fix` uses, and for
legacy drives both are the name QEMU itself gives the drive (its `query-block` device)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fix_support import AUDIT_DATA, DATA, materialize
from helpers import vmtrim
from test_fix_qemu import _OPTIONS as MIXED_OPTIONS
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.fix.policy import FixOptions, FixResult
from vmtrim.fix.qemu import fix_qemu_args
from vmtrim.sources.qemu_args import parse_qemu_command

OFFLINE = HostProbes(local=False)
INPUTS = sorted(
    str(path.relative_to(root)) for root in (DATA, AUDIT_DATA) for path in root.rglob("*.args")
)
OPTION_SETS = [FixOptions(), FixOptions(modernize=True), FixOptions(bus="scsi", all_disks=True)]


def audit_names(text: str) -> set[str]:
    domain = parse_qemu_command(text)
    return {r.disk.target or r.disk.ident for r in audit_domain(domain, OFFLINE, read_images=False)}


def fix_names(result: FixResult) -> tuple[set[str], set[str]]:
    """(every disk fix reports on, the disks it accounts for: fixed, already or left alone)."""
    accounted = {*result.fixed, *result.already, *(s.disk for s in result.skipped)}
    mentioned = (
        accounted | {c.disk for c in result.changes if c.disk} | {r.disk for r in result.remaining}
    )
    return mentioned, accounted


def check(text: str) -> None:
    names = audit_names(text)
    for options in OPTION_SETS:
        result = fix_qemu_args(text, options, probes=OFFLINE, read_images=False)
        mentioned, accounted = fix_names(result)
        assert mentioned <= names and accounted == names, options


@pytest.mark.parametrize("name", INPUTS)
def test_audit_and_fix_print_the_same_names(name: str, tmp_path: Path) -> None:
    """Through the real commands: audit --json's targets are fix --json's disks."""
    path = tmp_path / "input.args"
    path.write_text(materialize(name, tmp_path, images=False))
    audit = json.loads(vmtrim("audit", "--json", "--no-probe", "--qemu-args", str(path)).stdout)
    fixed = vmtrim("fix", "--json", "--no-probe", "--modernize", "--qemu-args", str(path))
    document = json.loads(fixed.stdout)
    accounted = {*document["fixed"], *document["already_enabled"]} | {
        skip["disk"] for skip in document["skipped"]
    }
    assert accounted == {disk["target"] for disk in audit["disks"]}
    check(path.read_text())


# Legacy drives in the shapes QEMU accepts; images are made per example.
_DRIVES = st.lists(
    st.sampled_from(
        [
            "if=ide",
            "if=ide,media=cdrom",
            "if=ide,index=1",
            "if=ide,index=3",
            "if=ide,bus=1",
            "if=ide,bus=1,unit=1",
            "if=virtio",
            "if=virtio,index=2",
            "if=floppy",
            "hdb",
            "hdd",
            "cdrom",
            "bare",
        ]
    ),
    min_size=1,
    max_size=5,
)


def legacy_argv(drives: list[str], machine: str, directory: Path) -> list[str]:
    argv = ["qemu-system-x86_64", "-machine", machine]
    for n, kind in enumerate(drives):
        image = directory / f"d{n}.raw"
        if not image.exists():
            image.write_bytes(b"\0" * 65536)
        if kind == "bare":
            argv.insert(1, str(image))
        elif kind in ("hdb", "hdd"):
            argv += [f"-{kind}", str(image)]
        elif kind == "cdrom":
            argv += ["-cdrom", str(image)]
        elif "cdrom" in kind:
            argv += ["-drive", f"{kind},file={image},format=raw,readonly=on"]
        elif "floppy" in kind:
            argv += ["-drive", f"{kind},file={image},format=raw"]
        else:
            argv += ["-drive", f"{kind},file={image},format=raw"]
    return argv


def qemu_names(argv: list[str]) -> set[str] | None:
    """The device names QEMU 7.2 gives the drives; None when QEMU refuses the line."""
    commands = [{"execute": "qmp_capabilities"}, {"execute": "query-block"}, {"execute": "quit"}]
    done = subprocess.run(
        [*argv, "-accel", "tcg", "-S", "-display", "none", "-nodefaults", "-qmp", "stdio"],
        input="\n".join(json.dumps(c) for c in commands) + "\n",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    for line in done.stdout.splitlines():
        reply = json.loads(line) if line.startswith("{") else {}
        if isinstance(reply.get("return"), list):
            return {entry["device"] for entry in reply["return"] if entry.get("inserted")}
    return None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(drives=_DRIVES, machine=st.sampled_from(["pc-i440fx-7.2", "pc-q35-7.2"]))
def test_names_are_the_names_qemu_gives(
    drives: list[str], machine: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("names")
    argv = legacy_argv(drives, machine, directory)
    try:
        domain = parse_qemu_command(argv)
    except BadInput:
        assert qemu_names(argv) is None  # vmtrim refuses what QEMU refuses (a taken slot)
        return
    ours = {disk.ident for disk in domain.disks if disk.source}
    expected = qemu_names(argv)
    if expected is None:  # QEMU refuses a shape vmtrim reads (e.g. IDE beyond q35's 6 ports)
        return
    assert ours == expected
    check(" ".join(argv))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(MIXED_OPTIONS), max_size=7))
def test_names_agree_on_mixed_command_lines(parts: list[str]) -> None:
    """-drive, -device, -blockdev, shorthands and bare images together (library only)."""
    text = " ".join(["qemu-system-x86_64", *parts])
    try:
        parse_qemu_command(text)
    except BadInput:
        return
    check(text)
