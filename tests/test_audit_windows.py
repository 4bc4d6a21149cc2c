"""The Windows rules, from agent replies shaped as qga/qapi-schema.json documents them.

No Windows guest can be booted here, so :class:`WindowsAgent` stands in for the agent,
and only as plumbing: it returns the documented replies of qemu-ga for Windows
(guest-get-osinfo with id "mswindows", guest-get-fsinfo with NTFS volumes named
``\\\\?\\Volume{GUID}\\``, guest-get-devices with the virtio-win driver versions), and
everything after that is vmtrim's real path: :func:`guest_facts` parses them into the
model, the libvirt XML parser reads the disks, and the audit applies the rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import vmtrim
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.channels.qmp import ExecStatus
from vmtrim.errors import AgentCommandFailed
from vmtrim.facts import WINDOWS_NO_COUNTS, WINDOWS_TRIM_TIMEOUT
from vmtrim.model import DiskReport, LayerKind, Severity, Verdict
from vmtrim.sources.libvirt_live import _guest_json, guest_facts
from vmtrim.sources.libvirt_xml import parse_domain_xml

# GuestOSInfo for Windows (qapi-schema.json): kernel-release is the build number,
# kernel-version the version number, id "mswindows", version-id the short version.
OSINFO = {
    "kernel-release": "22631",
    "kernel-version": "10.0",
    "machine": "x86_64",
    "id": "mswindows",
    "name": "Microsoft Windows",
    "pretty-name": "Windows 11 Pro",
    "version": "Microsoft Windows 11",
    "version-id": "11",
    "variant": "client",
    "variant-id": "client",
}
VOLUME = "\\\\?\\Volume{5f4a3b2c-1d0e-4f9a-8b7c-6d5e4f3a2b1c}\\"


def fsinfo(bus_type: str) -> list[dict[str, Any]]:
    """GuestFilesystemInfo of C:, one GuestDiskAddress (dev is the device UNC on Windows)."""
    return [
        {
            "name": VOLUME,
            "mountpoint": "C:\\",
            "type": "NTFS",
            "used-bytes": 21474836480,
            "total-bytes": 64424509440,
            "disk": [
                {
                    "pci-controller": {"domain": 0, "bus": 0, "slot": 5, "function": 0},
                    "bus-type": bus_type,
                    "bus": 0,
                    "target": 0,
                    "unit": 0,
                    "serial": "win-c",
                    "dev": "\\\\.\\PhysicalDrive0",
                }
            ],
        }
    ]


# GuestDeviceInfo (since 5.2): the virtio-win drivers, with their Windows version strings.
DEVICES = [
    {
        "driver-name": "vioscsi",
        "driver-date": 1715558400000000000,
        "driver-version": "100.95.104.28500",
        "id": {"type": "pci", "vendor-id": 6900, "device-id": 4168},
    },
    {
        "driver-name": "viostor",
        "driver-date": 1715558400000000000,
        "driver-version": "100.95.104.28500",
        "id": {"type": "pci", "vendor-id": 6900, "device-id": 4162},
    },
]


class WindowsAgent:
    """Plumbing only: the documented Windows replies; no guest-exec (there is no sh)."""

    def __init__(self, bus_type: str, devices: bool = True) -> None:
        self.replies: dict[str, Any] = {
            "guest-get-osinfo": OSINFO,
            "guest-get-fsinfo": fsinfo(bus_type),
        }
        if devices:
            self.replies["guest-get-devices"] = DEVICES
        self.asked: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        self.asked.append(command)
        if command not in self.replies:  # what qemu-ga before 5.2 says
            raise AgentCommandFailed(f"{command}: command not found", subject="win11")
        return self.replies[command]

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus:
        raise AssertionError(f"guest-exec {path} on a Windows guest")


def domain_xml(target: str, controller: str = "virtio-scsi") -> str:
    bus = {"sd": "scsi", "vd": "virtio", "hd": "sata"}[target[:2]]
    ctl = f"<controller type='scsi' index='0' model='{controller}'/>" if bus == "scsi" else ""
    return f"""<domain type='kvm'><name>win11</name>
<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os><devices>{ctl}
<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
<source file='/var/lib/libvirt/images/win11.qcow2'/>{{extra}}
<target dev='{target}' bus='{bus}'{{rate}}/><serial>win-c</serial></disk>
</devices></domain>"""


def audit(
    target: str,
    *,
    rate: str = "",
    extra: str = "",
    agent: WindowsAgent | None = None,
    xml: str | None = None,
) -> tuple[DiskReport, dict[str, Any]]:
    xml = xml or domain_xml(target).format(rate=rate, extra=extra)
    domain = parse_domain_xml(xml)
    bus_type = {"sd": "scsi", "vd": "virtio", "hd": "sata"}[target[:2]]
    guest_facts(agent or WindowsAgent(bus_type), domain, xml, 10.0)
    (report,) = audit_domain(domain, HostProbes(local=False), read_images=False)
    return report, _guest_json(domain)


def findings(report: DiskReport, severity: Severity) -> list[tuple[str, str | None]]:
    return [(f.message, f.fix) for f in report.findings if f.severity is severity]


def test_the_documented_replies_reach_the_model() -> None:
    agent = WindowsAgent("scsi")
    _, doc = audit("sda", agent=agent)
    assert (doc["os_id"], doc["os_name"], doc["kernel_release"]) == (
        "mswindows",
        "Windows 11 Pro",
        "22631",
    )
    assert doc["drivers"][0] == {"name": "vioscsi", "version": "100.95.104.28500"}
    assert doc["filesystems"] == [
        {"target": "sda", "mountpoint": "C:\\", "fstype": "NTFS", "mount_options": None}
    ]
    # Windows has no sh: no guest-exec, no mount options, no sysfs queue.
    assert "guest-exec" not in agent.asked and doc["queues"] == []
    assert doc["fstrim_timer"] is None


def test_vioscsi_without_rotation_rate_or_granularity() -> None:
    report, _ = audit("sda")
    fs = report.layer(LayerKind.GUEST_FS)
    assert (fs.verdict, fs.reason) == (
        Verdict.PASS,
        "Windows retrims a thin-provisioned SCSI disk",
    )
    driver = report.layer(LayerKind.GUEST_DRIVER)
    assert (driver.verdict, driver.reason) == (
        Verdict.PASS,
        "Windows vioscsi 100.95.104.28500: SCSI UNMAP (virtio-scsi)",
    )
    warnings = dict(findings(report, Severity.WARNING))
    [thin] = [m for m in warnings if "thin-provisioned" in m]
    assert "rewriting data" in thin and (warnings[thin] or "").startswith("vmtrim fix --ssd")
    [regression] = [m for m in warnings if "KB5089549" in m]
    assert "discard_granularity not set" in regression
    assert warnings[regression] == "vmtrim fix --discard-granularity 64K"
    info = [m for m, _ in findings(report, Severity.INFO)]
    assert WINDOWS_NO_COUNTS.summary in info  # no byte counts: host bytes only
    assert (
        "a Windows retrim (Optimize Drives) takes minutes: vmtrim trim waits"
        f" {WINDOWS_TRIM_TIMEOUT:g} s for a Windows guest unless --timeout is given"
    ) in info


def test_an_ssd_with_64k_granularity_has_no_warnings() -> None:
    report, _ = audit(
        "sda", rate=" rotation_rate='1'", extra="<blockio discard_granularity='65536'/>"
    )
    fs = report.layer(LayerKind.GUEST_FS)
    assert (fs.verdict, fs.reason) == (
        Verdict.PASS,
        "Windows sees an SSD (rotation_rate=1) and retrims it",
    )
    assert findings(report, Severity.WARNING) == []


@pytest.mark.parametrize("granularity", ["32768", "32K"])
def test_32k_is_a_remedy_too(granularity: str) -> None:
    extra = f"<blockio discard_granularity='{granularity}'/>"
    report, _ = audit("sda", rate=" rotation_rate='1'", extra=extra)
    assert not [m for m, _ in findings(report, Severity.WARNING) if "KB5089549" in m]


def test_sata_hard_disk_is_never_trimmed() -> None:
    report, _ = audit("hda")
    fs = report.layer(LayerKind.GUEST_FS)
    assert fs.verdict is Verdict.BLOCK
    assert fs.reason == (
        "Windows sees a hard disk drive (this sata disk has no rotation_rate=1):"
        " Optimize Drives defragments it and sends no TRIM"
    )
    assert fs.fix is not None and fs.fix.startswith("vmtrim fix --ssd")
    assert [f.message for f in report.findings if f.severity is Severity.BLOCK] == [fs.reason]
    ok, _ = audit("hda", rate=" rotation_rate='1'")
    assert ok.layer(LayerKind.GUEST_FS).verdict is Verdict.PASS


def test_viostor_rotation_rate_does_not_apply() -> None:
    report, _ = audit("vda")
    fs = report.layer(LayerKind.GUEST_FS)
    assert fs.verdict is Verdict.PASS and "rotation_rate does not apply to virtio-blk" in fs.reason
    driver = report.layer(LayerKind.GUEST_DRIVER)
    assert driver.verdict is Verdict.UNKNOWN
    assert driver.reason.startswith("Windows viostor 100.95.104.28500: it passes discard only")
    assert not [m for m, _ in findings(report, Severity.WARNING) if "KB5089549" in m]


def test_an_agent_before_5_2_has_no_driver_versions() -> None:
    report, doc = audit("vda", agent=WindowsAgent("virtio", devices=False))
    assert doc["drivers"] is None
    reason = report.layer(LayerKind.GUEST_DRIVER).reason
    assert reason.startswith("Windows viostor: it passes discard only")


def test_windows_on_lsilogic_is_not_vioscsi() -> None:
    xml = domain_xml("sda", controller="lsilogic").format(rate="", extra="")
    domain = parse_domain_xml(xml)
    guest_facts(WindowsAgent("scsi"), domain, xml, 10.0)
    (report,) = audit_domain(domain, HostProbes(local=False), read_images=False)
    driver = report.layer(LayerKind.GUEST_DRIVER)
    assert driver.verdict is Verdict.UNKNOWN and "lsilogic" in driver.reason


@pytest.mark.parametrize("libvirt", ["10.0", "9.0", "7.0"])
def test_the_fixes_the_advice_names_silence_it(tmp_path: Path, libvirt: str) -> None:
    """`vmtrim fix --ssd --discard-granularity 64K` writes <blockio>/<target rotation_rate>,
    <qemu:override> or <qemu:commandline> -set by libvirt version; the audit reads each."""
    before = tmp_path / "win11.xml"
    before.write_text(domain_xml("sda").format(rate="", extra=""))
    after = tmp_path / "fixed.xml"
    result = vmtrim(
        "fix", "--xml", str(before), "--ssd", "--discard-granularity", "64K",
        "--libvirt-version", libvirt, "--no-probe", "-o", str(after),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report, _ = audit("sda", xml=after.read_text())
    assert findings(report, Severity.WARNING) == []
    fs = report.layer(LayerKind.GUEST_FS)
    assert (fs.verdict, fs.reason) == (
        Verdict.PASS,
        "Windows sees an SSD (rotation_rate=1) and retrims it",
    )


LIBOSINFO = (
    "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>"
    "<libosinfo:os id='http://microsoft.com/win/11'/></libosinfo:libosinfo></metadata>"
)


def offline_audit(tmp_path: Path, target: str) -> dict[str, Any]:
    """`vmtrim audit --xml` of a shut-off definition that virt-install marked as Windows."""
    path = tmp_path / "win11.xml"
    xml = domain_xml(target).format(rate="", extra="")
    path.write_text(xml.replace("<os>", LIBOSINFO + "<os>", 1))
    result = vmtrim("audit", "--xml", str(path), "--json", "--no-probe")
    assert result.returncode == 0, result.stderr  # warnings; no layer proven to block
    [disk] = json.loads(result.stdout)["disks"]
    return dict(disk)


def test_without_an_agent_the_definitions_windows_gets_the_disk_rules(tmp_path: Path) -> None:
    sata = offline_audit(tmp_path, "hda")
    fs = next(la for la in sata["layers"] if la["layer"] == "guest_fs")
    assert fs["verdict"] == "unknown"  # the guest itself was not asked
    [hdd] = [f for f in sata["findings"] if "hard disk drive" in f["message"]]
    assert hdd["severity"] == "warning"
    assert hdd["message"].startswith("the definition says Windows (libosinfo): Windows sees")
    assert hdd["fix"].startswith("vmtrim fix --ssd")
    scsi = offline_audit(tmp_path, "sda")
    fixes = {f["fix"] for f in scsi["findings"] if f["severity"] == "warning"}
    assert "vmtrim fix --discard-granularity 64K" in fixes  # the May 2026 regression
    driver = next(la for la in scsi["layers"] if la["layer"] == "guest_driver")
    assert driver["reason"] == "Windows vioscsi: SCSI UNMAP (virtio-scsi)"
