"""vmtrim fix on QEMU command lines: discard on the right nodes, --modernize, --bus scsi."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fix_support import AUDIT_DATA, args_files, materialize
from helpers import vmtrim
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.fix.policy import FixOptions, FixResult
from vmtrim.fix.qemu import fix_qemu_args
from vmtrim.model import Disk, Verdict
from vmtrim.sources.qemu_args import parse_qemu_command, tokenize

OPTION_SETS = [
    FixOptions(),
    FixOptions(detect_zeroes="unmap"),
    FixOptions(modernize=True),
    FixOptions(bus="scsi"),
    FixOptions(bus="scsi", modernize=True),
    FixOptions(bus="scsi", all_disks=True),
]


def fix(text: str, options: FixOptions | None = None) -> FixResult:
    return fix_qemu_args(text, options, probes=HostProbes(local=False), read_images=False)


def options_of(text: str, name: str) -> list[str]:
    argv = tokenize(text)
    return [argv[i + 1] for i, token in enumerate(argv) if token == name]


def shape(disk: Disk) -> tuple[Any, ...]:
    """What a user compares between two command lines, ids and option order aside."""
    node = disk.node
    return (
        disk.source, disk.format, disk.qemu_device, disk.bus, disk.controller_model,
        disk.discard, node.cache if node else None, disk.read_only,
    )  # fmt: skip


def test_legacy_one_liner_becomes_the_current_one_liner() -> None:
    legacy = (AUDIT_DATA / "design-legacy.args").read_text()
    current = (AUDIT_DATA / "design-current.args").read_text()
    result = fix(legacy, FixOptions(bus="scsi", modernize=True))
    got = parse_qemu_command(result.new_text)
    want = parse_qemu_command(current)
    assert sorted(map(shape, got.disks)) == sorted(map(shape, want.disks))
    assert len(got.disks) == 2
    devices = [d.split(",")[0] for d in options_of(result.new_text, "-device")]
    assert sorted(devices) == sorted(d.split(",")[0] for d in options_of(current, "-device"))
    # The user's first line (program, flags, layout) is kept as it was.
    assert result.new_text.splitlines()[0] == legacy.splitlines()[0]


def test_current_one_liner_is_already_enabled() -> None:
    result = fix((AUDIT_DATA / "design-current.args").read_text())
    assert not result.changed and result.already == ["hd2", "hd"]


def test_libvirt_blockdev_gets_discard_on_the_format_node(tmp_path: Path) -> None:
    text = materialize("libvirt-blockdev.args", tmp_path, images=False)
    result = fix(text)
    before = [json.loads(v) for v in options_of(text, "-blockdev")]
    after = [json.loads(v) for v in options_of(result.new_text, "-blockdev")]  # still JSON
    assert after[0] == before[0]  # the storage node already said unmap
    assert after[1] == {**before[1], "discard": "unmap"}
    assert after[2:] == before[2:]  # the virtio disk on pc-i440fx-3.1 is left alone
    (skip,) = result.skipped
    assert skip.disk == "virtio-disk1" and skip.blocking and "pc-i440fx-3.1" in skip.reason


def test_bus_scsi_moves_virtio_blk_device_keeping_json(tmp_path: Path) -> None:
    text = materialize("libvirt-blockdev.args", tmp_path, images=False)
    result = fix(text, FixOptions(bus="scsi"))
    moved = json.loads(options_of(result.new_text, "-device")[-1])
    assert moved == {"driver": "scsi-hd", "bus": "scsi0.0", "drive": "libvirt-1-format",
                     "id": "virtio-disk1"}  # fmt: skip
    assert json.loads(options_of(result.new_text, "-blockdev")[3])["discard"] == "unmap"
    assert result.skipped == []


def test_keyval_blockdev_inline_child_override(tmp_path: Path) -> None:
    text = materialize("keyval-blockdev.args", tmp_path, images=False)
    result = fix(text)
    first, second = options_of(result.new_text, "-blockdev")
    assert first.split(",") == [
        "driver=qcow2", "node-name=top", "file.driver=file",
        f"file.filename={tmp_path}/kv.qcow2", "file.discard=unmap", "discard=unmap",
    ]  # fmt: skip
    assert second.endswith(",discard=unmap") and "kv,,comma.raw" in second


def test_legacy_mixed_without_and_with_modernize(tmp_path: Path) -> None:
    text = materialize("legacy-mixed.args", tmp_path, images=False)
    plain = fix(text)
    # Named as QEMU names them: index 2 on pc is bus 1, unit 0.
    assert {s.disk: s.blocking for s in plain.skipped} == {"virtio0": True, "ide1-cd0": False}
    drives = options_of(plain.new_text, "-drive")
    assert f"file={tmp_path}/hdb.raw,if=ide,index=1,media=disk,discard=unmap" in drives
    modern = fix(text, FixOptions(modernize=True))
    devices = options_of(modern.new_text, "-device")
    # The bus and unit QEMU gave each legacy IDE drive: index 0, 1 and 3 (2 is the cdrom).
    assert [d.split(",drive=")[0] for d in devices] == [
        "ide-hd,bus=ide.0,unit=0", "ide-hd,bus=ide.0,unit=1", "ide-hd,bus=ide.1,unit=1",
    ]  # fmt: skip
    assert "if=ide,index=2,media=cdrom" in options_of(modern.new_text, "-drive")


def test_output_keeps_the_layout(tmp_path: Path) -> None:
    """Only the lines whose values changed differ; the rest is the input, byte for byte."""
    text = materialize("keyval-blockdev.args", tmp_path, images=False)
    result = fix(text)
    old, new = text.splitlines(keepends=True), result.new_text.splitlines(keepends=True)
    assert len(old) == len(new)
    changed = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    assert [old[i].split()[0] for i in changed] == ["-blockdev", "-blockdev"]
    # The changes are a value (ignore -> unmap) and an inserted key; nothing else moved.
    undone = [new[i].replace(",discard=unmap", "") for i in changed]
    assert undone == [old[i].replace("file.discard=ignore", "file.discard=unmap") for i in changed]


@pytest.mark.parametrize("name", args_files())
def test_idempotent_and_audit_agrees(name: str, tmp_path: Path) -> None:
    text = materialize(name, tmp_path, images=False)
    for options in OPTION_SETS:
        first = fix(text, options)
        second = fix(first.new_text, options)
        assert second.new_text == first.new_text, options
        assert second.changes == []
        skipped = {skip.disk for skip in first.skipped}
        names = set(first.fixed) | set(first.already)
        reports = audit_domain(parse_qemu_command(first.new_text), HostProbes(local=False),
                               read_images=False)  # fmt: skip
        blocking = [r for r in reports if r.config_verdict is Verdict.BLOCK and not r.exempt]
        # Every disk that still blocks at the configuration is one fix said it left alone.
        assert len(blocking) <= len([s for s in first.skipped if s.blocking]), (name, options)
        assert len(names) + len(skipped) >= len([r for r in reports if not r.exempt])
        # A disk fix changed or found fine passes at the configuration layers afterwards.
        still = {r.disk for r in first.remaining if r.layer in ("device", "block_node")
                 and r.verdict == "block"}  # fmt: skip
        assert not still & names, (name, options, still)
        assert not names & skipped  # one disk, one outcome


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ls -l",
        "qemu-system-x86_64 -blockdev '{\"driver\":'",
        "qemu-system-x86_64 -device scsi-hd,drive=nowhere",
        "qemu-system-x86_64 -drive",
        "qemu-system-x86_64 'unterminated",
    ],
)
def test_bad_command_lines_are_bad_input(text: str) -> None:
    with pytest.raises(BadInput):
        fix(text)


def test_nul_separated_input() -> None:
    text = (AUDIT_DATA / "design-legacy.args").read_text()
    argv = tokenize(text)
    from_proc = fix_qemu_args(
        "\0".join(argv).encode() + b"\0", FixOptions(modernize=True),
        probes=HostProbes(local=False), read_images=False,
    )  # fmt: skip
    shell = fix(text, FixOptions(modernize=True)).new_text
    assert tokenize(from_proc.new_text) == tokenize(shell)
    assert from_proc.new_text.endswith("\0") and "\n" not in from_proc.new_text  # still NULs


# -- property: random command lines are fixed or refused, and fixing is idempotent ----------

_OPTIONS = [
    "-drive file=/i/a.qcow2,if=ide,format=qcow2",
    "-drive file=/i/b.raw,if=virtio,discard=off",
    "-drive file=/i/c.qcow2,if=scsi",
    "-drive file=/i/d.raw,if=none,id=d0",
    "-drive if=ide,media=cdrom",
    "-device scsi-hd,drive=d0",
    "-device ide-hd,drive=d0",
    "-device virtio-blk-pci,drive=d0,num-queues=2",
    "-device virtio-scsi-pci,id=scsi0",
    "-blockdev driver=file,filename=/i/e.raw,node-name=e0",
    '-blockdev \'{"driver":"qcow2","node-name":"f0","file":{"driver":"file",'
    '"filename":"/i/f.qcow2"}}\'',
    '-device \'{"driver":"scsi-hd","drive":"f0"}\'',
    "-device virtio-blk-pci,drive=e0",
    "-hda /i/h.raw",
    "-M pc-i440fx-3.1",
    "-machine pc-q35-7.2",
    "-m 128",
    "-S",
    "-frob",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_OPTIONS), max_size=7), st.sampled_from(OPTION_SETS))
def test_fix_raises_only_bad_input_and_is_idempotent(parts: list[str], options: FixOptions) -> None:
    text = " ".join(["qemu-system-x86_64", *parts])
    try:
        first = fix(text, options)
    except BadInput:
        return
    second = fix(first.new_text, options)
    assert second.new_text == first.new_text


def test_unknown_option_is_a_warning_and_the_rest_is_fixed(tmp_path: Path) -> None:
    """Proxmox-style -id and a made-up option: named on stderr, the disk still fixed."""
    path = tmp_path / "pve.args"
    path.write_text(
        "/usr/bin/kvm -id 100 -x-vendor-knob 7 -machine pc-q35-7.2 \\\n"
        "  -drive file=/i/a.raw,if=none,id=drive-scsi0,format=raw \\\n"
        "  -device virtio-scsi-pci,id=hba -device scsi-hd,bus=hba.0,drive=drive-scsi0,id=scsi0\n"
    )
    done = vmtrim("fix", "--qemu-args", str(path), "--no-probe", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "-x-vendor-knob" in done.stderr and "'-id'" not in done.stderr
    assert "+  -drive file=/i/a.raw,if=none,id=drive-scsi0,format=raw,discard=unmap \\" in (
        done.stdout.splitlines()
    )
