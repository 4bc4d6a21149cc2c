"""The issue's "must hold" items for `vmtrim audit`, through the library and the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from helpers import vmtrim
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.model import DiskReport, LayerKind, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_file, parse_domain_xml
from vmtrim.sources.qemu_args import parse_qemu_command, read_args_file

DATA = Path(__file__).parent / "data" / "audit"
OFFLINE = HostProbes(local=False)


def audit_json(*args: str, stdin: str | None = None) -> tuple[int, dict[str, Any]]:
    proc = vmtrim("audit", "--json", *args, stdin=stdin)
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def layer(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in doc["layers"] if item["layer"] == name)


def reports_xml(text: str) -> list[DiskReport]:
    return audit_domain(parse_domain_xml(text), OFFLINE)


# ---------------------------------------------------------------- DESIGN.md's configurations


def test_design_ide_disk_with_discard_passes_config_layers() -> None:
    code, doc = audit_json("--no-probe", "--xml", str(DATA / "design-ide.xml"))
    (disk,) = doc["disks"]
    assert (disk["target"], disk["bus"], disk["discard"]) == ("sdb", "ide", "unmap")
    for name in ("device", "block_node", "guest_driver"):
        assert layer(disk, name)["verdict"] == "pass", layer(disk, name)
    assert disk["config_verdict"] == "pass"
    assert code == 0


def test_design_scsi_disk_without_discard_blocks_at_block_layer() -> None:
    code, doc = audit_json("--no-probe", "--xml", str(DATA / "design-scsi.xml"))
    (disk,) = doc["disks"]
    assert (disk["target"], disk["bus"], disk["discard"]) == ("sda", "scsi", None)
    assert disk["controller_model"] == "virtio-scsi"
    blocked = layer(disk, "block_node")
    assert blocked["verdict"] == "block"
    assert "discard='unmap'" in blocked["fix"]
    assert layer(disk, "device")["verdict"] == "pass"
    assert disk["verdict"] == "block"
    assert disk["findings"][0]["severity"] == "block"
    assert code == 1


@pytest.mark.parametrize("name", ["design-legacy.args", "design-current.args"])
def test_design_qemu_one_liners_pass(name: str) -> None:
    code, doc = audit_json("--no-probe", "--qemu-args", str(DATA / name))
    assert len(doc["disks"]) == 2
    for disk in doc["disks"]:
        assert disk["discard"] == "unmap"
        assert disk["format"] == "qcow2"
        assert disk["config_verdict"] == "pass"
        assert layer(disk, "block_node")["verdict"] == "pass"
    buses = {disk["bus"] for disk in doc["disks"]}
    assert buses == ({"ide"} if "legacy" in name else {"scsi"})
    assert code == 0


# ---------------------------------------------------------------- virtio-blk and machine types

VIRTIO_XML = """<domain type='kvm'><name>v</name>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices><disk type='file' device='disk'>
    <driver name='qemu' type='raw' discard='unmap'/>
    <source file='/var/lib/libvirt/images/v.img'/><target dev='vda' bus='virtio'/>
  </disk></devices></domain>"""


def test_virtio_on_old_machine_blocks_naming_the_machine_type() -> None:
    (report,) = reports_xml(VIRTIO_XML.format(machine="pc-i440fx-3.1"))
    device = report.layer(LayerKind.DEVICE)
    assert device.verdict is Verdict.BLOCK
    assert "pc-i440fx-3.1" in device.reason
    assert report.blocks


def test_virtio_on_new_machine_passes() -> None:
    (report,) = reports_xml(VIRTIO_XML.format(machine="pc-q35-7.2"))
    assert report.layer(LayerKind.DEVICE).verdict is Verdict.PASS
    assert report.config_verdict is Verdict.PASS
    assert not report.blocks


def test_virtio_machine_type_on_the_command_line() -> None:
    line = (
        "qemu-system-x86_64 -machine {m},accel=tcg -drive file=/x.img,format=raw,if=none,"
        "id=d0,discard=unmap -device virtio-blk-pci,drive=d0,id=vd0"
    )
    old = audit_domain(parse_qemu_command(line.format(m="pc-i440fx-3.1")), OFFLINE)[0]
    new = audit_domain(parse_qemu_command(line.format(m="pc-q35-7.2")), OFFLINE)[0]
    assert old.layer(LayerKind.DEVICE).verdict is Verdict.BLOCK
    assert "pc-i440fx-3.1" in old.layer(LayerKind.DEVICE).reason
    assert new.layer(LayerKind.DEVICE).verdict is Verdict.PASS
    # An explicit discard=on on the device overrides the old machine's default.
    forced = parse_qemu_command(line.format(m="pc-i440fx-3.1") + ",discard=on")
    assert audit_domain(forced, OFFLINE)[0].layer(LayerKind.DEVICE).verdict is Verdict.PASS
    short = parse_qemu_command(line.replace("-machine {m},accel=tcg", "-M pc-i440fx-3.1"))
    assert short.machine == "pc-i440fx-3.1"


# ---------------------------------------------------------------- exit codes and read-only


def test_cdroms_read_only_and_empty_drives_do_not_fail_the_run() -> None:
    code, doc = audit_json("--no-probe", "--xml", str(DATA / "readonly-only.xml"))
    assert {d["device"] for d in doc["disks"]} == {"cdrom", "disk"}
    assert all(d["exempt"] for d in doc["disks"])
    assert code == 0


def test_json_document_shape() -> None:
    _, doc = audit_json("--no-probe", "--xml", str(DATA / "design-scsi.xml"))
    assert doc["schema"] == "vmtrim.audit/1"
    (disk,) = doc["disks"]
    for key in (
        "domain",
        "target",
        "device",
        "bus",
        "source",
        "format",
        "discard",
        "verdict",
        "layers",
        "findings",
    ):
        assert key in disk
    assert [item["layer"] for item in disk["layers"]] == [
        "guest_fs",
        "guest_driver",
        "device",
        "block_node",
        "host_storage",
    ]
    for item in disk["layers"]:
        assert set(item) == {"layer", "verdict", "reason", "fix"}
        assert item["verdict"] in ("pass", "block", "unknown")


def test_human_table_lists_layers_and_findings() -> None:
    proc = vmtrim("audit", "--no-probe", "--xml", str(DATA / "design-scsi.xml"))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:6] == ["domain", "target", "bus", "source", "format", "discard"]
    assert lines[1].split()[:3] == ["design-scsi", "sda", "scsi"]
    assert "add discard='unmap'" in lines[2]  # the blocking finding comes first, below the row


def test_stdin_input() -> None:
    text = (DATA / "design-current.args").read_text()
    code, doc = audit_json("--no-probe", "--qemu-args", "-", stdin=text)
    assert code == 0 and len(doc["disks"]) == 2


# ---------------------------------------------------------------- bad input: one line, exit 2

BAD = {
    "malformed.xml": ("<domain><name>x</name><devices>", "malformed XML"),
    "network.xml": ("<network><name>default</name></network>", "not a libvirt domain"),
    "entity.xml": (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        "<domain><name>&e;</name></domain>",
        None,
    ),
}


@pytest.mark.parametrize("name", ["malformed.xml", "network.xml"])
def test_bad_xml_is_one_line_exit_2(tmp_path: Path, name: str) -> None:
    text, message = BAD[name]
    path = tmp_path / name
    path.write_text(text)
    proc = vmtrim("audit", "--xml", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"vmtrim: {path}: ")
    assert message is not None and message in proc.stderr


def test_xml_entities_are_not_resolved(tmp_path: Path) -> None:
    text, _ = BAD["entity.xml"]
    domain = parse_domain_xml(text)
    assert "root:" not in domain.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ('qemu-system-x86_64 -blockdev \'{"driver":"file",\' -m 1g', "invalid JSON"),
        ("qemu-system-x86_64 -m 1g 2>&1", "shell syntax '>'"),
        ("qemu-system-x86_64 -drive", "needs an argument"),
        ("qemu-system-x86_64 -drive 'file=/x", "cannot split"),
        ("qemu-system-x86_64 -device scsi-hd,drive=nowhere", "no -blockdev or -drive named"),
    ],
)
def test_bad_command_line_is_one_line_exit_2(tmp_path: Path, args: str, message: str) -> None:
    path = tmp_path / "cmd.args"
    path.write_text(args)
    proc = vmtrim("audit", "--qemu-args", str(path))
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"vmtrim: {path}: ")
    assert message in proc.stderr


@pytest.mark.parametrize("option", ["--xml", "--qemu-args"])
def test_missing_file_is_one_line_exit_2(tmp_path: Path, option: str) -> None:
    missing = tmp_path / "nope"
    proc = vmtrim("audit", option, str(missing))
    assert (proc.returncode, proc.stderr) == (2, f"vmtrim: {missing}: no such file\n")


def test_missing_pid_is_one_line_exit_2() -> None:
    proc = vmtrim("audit", "--pid", "999999999")
    assert (proc.returncode, proc.stderr) == (2, "vmtrim: pid 999999999: no such process\n")


def test_pid_that_is_not_qemu_is_one_line_exit_2() -> None:
    own = vmtrim("audit", "--pid", str(os.getpid()))
    assert own.returncode == 2
    assert own.stderr.startswith(f"vmtrim: pid {os.getpid()}: not a QEMU command line")
    kthread = vmtrim("audit", "--pid", "2")  # kthreadd: no command line at all
    assert (kthread.returncode, kthread.stderr.count("\n")) == (2, 1)
    assert "no command line" in kthread.stderr


def test_directory_instead_of_file_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = vmtrim("audit", "--xml", str(tmp_path))
    expected = f"vmtrim: {tmp_path}: is a directory, not a file\n"
    assert (proc.returncode, proc.stderr) == (2, expected)


def test_no_input_is_a_usage_error() -> None:
    proc = vmtrim("audit")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_unknown_elements_and_devices_never_crash() -> None:
    domain = parse_domain_file(str(DATA / "odd-devices.xml"))
    reports = audit_domain(domain, OFFLINE)
    assert {r.disk.ident for r in reports} >= {"vda", "disk[2]", "xx0"}
    args = read_args_file(str(DATA / "odd-devices.args"))
    assert [d.qemu_device for d in args.disks] == ["scsi-hd"]
