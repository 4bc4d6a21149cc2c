"""vmtrim fix on libvirt domain XML: what changes, what stays, and that audit agrees."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from fix_support import AUDIT_DATA, DATA, materialize, xml_files
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.fix.policy import FixOptions, FixResult
from vmtrim.fix.xml import disk_index, fix_domain_xml, index_to_letters
from vmtrim.model import Verdict, XmlHostdev
from vmtrim.sources.libvirt_xml import parse_domain_xml

SCSI = FixOptions(bus="scsi")
OPTION_SETS = [
    FixOptions(),
    FixOptions(detect_zeroes="unmap"),
    SCSI,
    FixOptions("unmap", "scsi", True),
]


def fix(text: str, options: FixOptions | None = None) -> FixResult:
    return fix_domain_xml(text, options, probes=HostProbes(local=False), read_images=False)


def disk_by_source(text: str, name: str) -> etree._Element:
    root = etree.fromstring(text.encode())
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        values = source.attrib.values() if source is not None else []
        if any(isinstance(v, str) and v.endswith("/" + name) for v in values):
            return disk
    raise AssertionError(name)


# -- the configurations the project started from ------------------------------------------


def test_design_scsi_disk_without_discard_gets_a_driver(tmp_path: Path) -> None:
    # The whole fixed text is the golden file data/fix/design-scsi-nodriver.xml.out.
    result = fix(materialize("design-scsi-nodriver.xml", tmp_path, images=False))
    assert result.fixed == ["sda"] and result.skipped == []


def test_design_ide_disk_is_already_enabled() -> None:
    text = (AUDIT_DATA / "design-ide.xml").read_text()
    result = fix(text)
    assert not result.changed and result.diff == ""
    assert result.already == ["sdb"] and result.changes == []


# -- left alone, with a reason ------------------------------------------------------------


def test_mixed_disks_skips_and_keeps_everything_else(tmp_path: Path) -> None:
    text = materialize("mixed.xml", tmp_path, images=False)
    result = fix(text)
    reasons = {skip.disk: skip.reason.split(":")[0] for skip in result.skipped}
    assert reasons == {
        "vdd": "read-only",
        "vde": "shareable",
        "vdf": "read-only",
        "sdb": "lun",
        "sdc": "cdrom",
    }
    assert not any(skip.blocking for skip in result.skipped)
    assert sorted(result.fixed) == ["sda", "vda", "vdb", "vdc"]
    assert result.already == ["sdd"]
    # That only the four <driver> lines change is the golden file data/fix/mixed.xml.out.


def test_old_machine_virtio_needs_bus_scsi(tmp_path: Path) -> None:
    result = fix(materialize("old-virtio.xml", tmp_path, images=False))
    blocking = {skip.disk: skip.reason for skip in result.skipped if skip.blocking}
    assert set(blocking) == {"vda", "vdb"}
    assert all("pc-i440fx-3.1" in r and "--bus scsi" in r for r in blocking.values())
    assert sorted(result.fixed) == ["hda", "sda"]


def test_bus_scsi_moves_virtio_disks(tmp_path: Path) -> None:
    text = materialize("old-virtio.xml", tmp_path, images=False)
    result = fix(text, SCSI)
    root = etree.fromstring(result.new_text.encode())
    scsi = root.findall("devices/controller[@type='scsi']")
    assert [(c.get("index"), c.get("model")) for c in scsi] == [
        ("0", "lsilogic"),
        ("1", "virtio-scsi"),
    ]
    root_disk = disk_by_source(result.new_text, "root.qcow2")
    target = root_disk.find("target")
    address = root_disk.find("address")
    assert target is not None and address is not None
    # sda is taken by the lsilogic disk: the first free name is sdb.
    assert (target.get("dev"), target.get("bus")) == ("sdb", "scsi")
    assert dict(address.attrib.items()) == {
        "type": "drive", "controller": "1", "bus": "0", "target": "0", "unit": "0",
    }  # fmt: skip
    driver = root_disk.find("driver")
    assert driver is not None and "queues" not in driver.attrib
    assert driver.get("discard") == "unmap"
    assert root_disk.findtext("serial") == "root-serial"
    boot = root_disk.find("boot")
    assert boot is not None and boot.get("order") == "1"
    data = disk_by_source(result.new_text, "data.raw")
    data_address = data.find("address")
    assert data_address is not None and data_address.get("unit") == "1"
    # The new <address> and <controller> are indented like their siblings.
    assert "\n      <address type='drive' controller='1'" in result.new_text
    assert '\n      <address type="drive" controller="1"' in result.new_text  # its quote style
    assert "\n    <controller type='scsi' index='1' model='virtio-scsi'/>\n" in result.new_text
    assert result.skipped[0].disk == "hdc" and len(result.skipped) == 1


def test_all_disks_avoids_unit_and_name_collisions(tmp_path: Path) -> None:
    text = materialize("all-disks.xml", tmp_path, images=False)
    result = fix(text, FixOptions(bus="scsi", all_disks=True))
    root = etree.fromstring(result.new_text.encode())
    slots = []
    names = []
    for disk in root.iterfind("devices/disk"):
        target, address = disk.find("target"), disk.find("address")
        assert target is not None and address is not None
        assert target.get("bus") == "scsi"
        names.append(target.get("dev"))
        slots.append((address.get("controller"), address.get("unit")))
    assert len(set(names)) == len(names) == 3
    assert len(set(slots)) == 3 and {c for c, _ in slots} == {"0"}
    assert len(root.findall("devices/controller[@type='scsi']")) == 1  # reused, not added
    alias = disk_by_source(result.new_text, "a.qcow2").find("alias")
    assert alias is not None and alias.get("name") == "ua-root"


def test_disk_index_names_round_trip() -> None:
    for index in (0, 1, 25, 26, 27, 701, 702):
        assert disk_index("sd" + index_to_letters(index)) == index
    assert index_to_letters(26) == "aa" and disk_index("vdz") == 25


# -- every file in the test set: idempotent, audit agrees, libvirt's schema accepts ---------


def _load(name: str, tmp_path: Path) -> str:
    return materialize(name, tmp_path, images=False)


@pytest.mark.parametrize("name", xml_files())
def test_idempotent_and_audit_agrees(name: str, tmp_path: Path) -> None:
    text = _load(name, tmp_path)
    for options in OPTION_SETS:
        first = fix(text, options)
        second = fix(first.new_text, options)
        assert second.new_text == first.new_text, options
        assert not second.changed and second.changes == []
        skipped = {skip.disk for skip in first.skipped}
        reports = audit_domain(parse_domain_xml(first.new_text), HostProbes(local=False),
                               read_images=False)  # fmt: skip
        for report in reports:
            name_ = report.disk.target or report.disk.ident
            if name_ in skipped or report.disk.locator is None:
                continue
            if isinstance(report.disk.locator, XmlHostdev):
                continue
            # Fixed disks pass at the block layer; the device passes, or is unknown for a
            # reason fix cannot change (a machine alias such as "pc") and says so.
            layers = {layer.kind.value: layer for layer in report.layers}
            assert layers["block_node"].verdict is Verdict.PASS, (name, options, name_)
            device = layers["device"]
            assert device.verdict is not Verdict.BLOCK, (name, options, name_)
            if device.verdict is Verdict.UNKNOWN:
                assert any(r.reason == device.reason for r in first.remaining)


def _validates(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )


def _schema_errors(path: Path) -> list[str]:
    """virt-xml-validate's complaints without file names and line numbers."""
    lines = _validates(path).stderr.splitlines()
    return sorted(re.sub(r"^\S+:\d+: ", "", line).replace(str(path), "F") for line in lines)


@pytest.mark.parametrize("name", xml_files())
def test_virt_xml_validate_accepts_fixed_xml(name: str, tmp_path: Path) -> None:
    text = _load(name, tmp_path)
    before = tmp_path / "before.xml"
    before.write_text(text)
    valid_before = _validates(before).returncode == 0
    # Our own files are valid libvirt XML; some of AUDIT's hold unknown elements on purpose
    # (odd-devices, zoo): for those the fix must add no schema error of its own.
    assert valid_before or not (DATA / name).exists(), _validates(before).stderr
    for options in OPTION_SETS:
        after = tmp_path / "after.xml"
        after.write_text(fix(text, options).new_text)
        if valid_before:
            checked = _validates(after)
            assert checked.returncode == 0, (options, checked.stderr)
        else:
            assert _schema_errors(after) == _schema_errors(before), options


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "<domain>", "<network><name>x</name></network>", "plain text", "<domain><a></b></domain>"],
)
def test_bad_xml_is_bad_input(text: str) -> None:
    with pytest.raises(BadInput):
        fix(text)


def test_modernize_is_for_qemu_only() -> None:
    with pytest.raises(BadInput):
        fix((AUDIT_DATA / "design-ide.xml").read_text(), FixOptions(modernize=True))


# -- property: any domain XML is fixed or refused as bad input, and fixing is idempotent ---

_TYPES = ["file", "block", "network", "volume", "dir", "teleport"]
_DEVICES = ["disk", "disk", "cdrom", "lun", "floppy", "hologram"]
_BUSES = ["virtio", "scsi", "ide", "sata", "usb", "fdc", "sd", "nvme", "xen", "weird", None]
_MACHINES = ["pc-i440fx-3.1", "pc-q35-7.2", "pc", None]


@st.composite
def domains(draw: st.DrawFn) -> str:
    disks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(_TYPES))
        device = draw(st.sampled_from(_DEVICES))
        bus = draw(st.sampled_from(_BUSES))
        dev = draw(st.sampled_from(["vda", "vdb", "sda", "sdb", "hda", "fda", "xx0", None]))
        parts = [f"<disk type='{kind}' device='{device}'>"]
        if draw(st.booleans()):
            attrs = draw(st.sampled_from(["", " name='qemu'", " type='qcow2'",
                                          " name='qemu' type='raw' discard='ignore'",
                                          " queues='4' discard='unmap'"]))  # fmt: skip
            parts.append(f"<driver{attrs}/>")
        if draw(st.booleans()):
            key = {"file": "file", "block": "dev", "dir": "dir"}.get(kind, "name")
            extra = " protocol='rbd'" if kind == "network" else ""
            if kind == "volume":
                parts.append("<source pool='p' volume='v'/>")
            else:
                parts.append(f"<source{extra} {key}='/x/{draw(st.sampled_from('abc'))}'/>")
        if dev is not None:
            bus_attr = f" bus='{bus}'" if bus else ""
            parts.append(f"<target dev='{dev}'{bus_attr}/>")
        address = draw(st.sampled_from([None, "pci", "drive"]))
        if address == "pci":
            parts.append("<address type='pci' domain='0x0000' bus='0x00' slot='0x07'/>")
        elif address == "drive":
            parts.append(f"<address type='drive' controller='{draw(st.sampled_from('01x'))}'"
                         f" unit='{draw(st.sampled_from('01'))}'/>")  # fmt: skip
        for flag in ("readonly", "shareable"):
            if draw(st.integers(0, 5)) == 0:
                parts.append(f"<{flag}/>")
        disks.append("\n      ".join(parts) + "\n    </disk>")
    controllers = draw(st.sampled_from([
        "", "<controller type='scsi' index='0' model='virtio-scsi'/>",
        "<controller type='scsi' index='0'/>", "<controller type='scsi' model='lsilogic'/>",
    ]))  # fmt: skip
    machine = draw(st.sampled_from(_MACHINES))
    os_type = f"<type arch='x86_64' machine='{machine}'>hvm</type>" if machine else ""
    body = "\n    ".join([*disks, controllers])
    return (
        f"<domain type='qemu'>\n  <name>h</name>\n  <os>{os_type}</os>\n"
        f"  <devices>\n    {body}\n  </devices>\n</domain>\n"
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(domains(), st.sampled_from(OPTION_SETS), st.integers(0, 400), st.integers(0, 3))
def test_fix_raises_only_bad_input_and_is_idempotent(
    text: str, options: FixOptions, cut: int, width: int
) -> None:
    for candidate in (text, text[:cut] + text[cut + width :]):
        try:
            first = fix(candidate, options)
        except BadInput:
            continue
        second = fix(first.new_text, options)
        assert second.new_text == first.new_text


@pytest.mark.parametrize("name", xml_files())
@pytest.mark.parametrize(
    "options",
    [FixOptions(), FixOptions(bus="scsi", all_disks=True, detect_zeroes="unmap")],
    ids=["discard", "all-disks"],
)
@pytest.mark.parametrize("ending", ["\n", ""], ids=["newline", "no-newline"])
def test_dry_run_diff_applies_with_patch(
    name: str, options: FixOptions, ending: str, tmp_path: Path
) -> None:
    """The diff built from the editor's edits is one patch(1) applies to give the fix."""
    text = materialize(name, tmp_path, images=False).rstrip("\n") + ending
    result = fix_domain_xml(text, options, probes=HostProbes(local=False), read_images=False)
    target = tmp_path / "domain.xml"
    target.write_text(text)
    applied = subprocess.run(
        ["patch", "--no-backup-if-mismatch", str(target)],
        input=result.diff,
        capture_output=True,
        text=True,
        check=False,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert target.read_text() == result.new_text


def test_diff_of_many_disks_has_a_line_per_change(tmp_path: Path) -> None:
    disk = (
        "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n"
        "      <source file='/i/{n}.img'/>\n      <target dev='sd{n}' bus='scsi'/>\n"
        "    </disk>\n"
    )
    names = [f"{a}{b}" for a in "abcdefghij" for b in "abcdefghijklmnopqrstuvwxyz"]
    text = "<domain type='kvm'>\n  <name>many</name>\n  <devices>\n"
    text += "".join(disk.format(n=n) for n in names) + "  </devices>\n</domain>\n"
    result = fix_domain_xml(text, probes=HostProbes(local=False), read_images=False)
    lines = result.diff.splitlines()
    removed = [line for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line for line in lines if line.startswith("+") and not line.startswith("+++")]
    assert removed == ["-      <driver name='qemu' type='raw'/>"] * len(names)
    assert added == ["+      <driver name='qemu' type='raw' discard='unmap'/>"] * len(names)


def test_diff_of_a_file_without_a_final_newline_leaves_its_last_line(tmp_path: Path) -> None:
    text = materialize("design-scsi-nodriver.xml", tmp_path, images=False).rstrip("\n")
    result = fix_domain_xml(text, probes=HostProbes(local=False), read_images=False)
    assert not result.new_text.endswith("\n")
    changed = [line for line in result.diff.splitlines() if line[:1] in "+-"]
    assert changed[2:] == ["+      <driver name='qemu' type='raw' discard='unmap'/>"]
