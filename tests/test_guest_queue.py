"""`vmtrim audit -c` reads each disk's discard facts in the guest, and what fstrim.timer trims.

One lab guest under the real libvirtd (TCG), qemu-ga in it, four ext4 disks, each
labelled with its libvirt target:

- sda: scsi-hd on virtio-scsi with ``rotation_rate=1`` (what ``vmtrim fix --ssd`` sets),
  mounted on /mnt, the one listed in the guest's /etc/fstab;
- sdb: scsi-hd with ``discard_granularity=0`` (a ``<qemu:override>`` device property:
  libvirt 9.0 has no ``<blockio discard_granularity>``), mounted on /srv by hand;
- vdb: virtio-blk with ``discard=false`` (``<qemu:override>`` too), mounted on /opt by
  hand; it also carries the host's own systemctl with its libraries and util-linux's
  fstrim.service and fstrim.timer, installed into the guest and the timer enabled;
- vdc: virtio-blk with ``discard_granularity=0``, mounted on /data by hand;
- vdd: virtio-blk with 4 KiB physical blocks and discard_granularity, its ext4 in a
  partition at sector 63 (not 4 KiB-aligned), mounted on /part: the partition's
  alignment_offset and discard_alignment are 512, not 0.

The guest's sysfs is read a second time, independently, with ``virsh
qemu-agent-command`` guest-exec, and the audit's numbers must be those. The XML says
discard='unmap' on every disk, so only the guest's own view can show that sdb and vdb
get no discard (discard_max_bytes 0: guest_driver block) while vdc does: QEMU's
virtio-blk ignores discard_granularity=0 (facts rows scsi_dg0, virtio_blk_dg0).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

import lab_domains
from helpers import vmtrim
from vmtrim.errors import GuestFailed
from vmtrim.lab import Appliance
from vmtrim.lab.build import shared_libraries
from vmtrim.vm.guest import ControlChannel, DiskSpec, GuestSpec, RunPaths, serial_tail
from vmtrim.vm.libvirt import lab_domain_xml

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# target -> (bus, override properties of its QEMU device, where the guest mounts it)
DISKS: dict[str, tuple[str, dict[str, tuple[str, str]], str]] = {
    "sda": ("scsi", {"rotation_rate": ("unsigned", "1")}, "/mnt"),
    "sdb": ("scsi", {"discard_granularity": ("unsigned", "0")}, "/srv"),
    "vdb": ("virtio", {"discard": ("bool", "false")}, "/opt"),
    "vdc": ("virtio", {"discard_granularity": ("unsigned", "0")}, "/data"),
    "vdd": (
        "virtio",
        {"physical_block_size": ("unsigned", "4096"), "discard_granularity": ("unsigned", "4096")},
        "/part",
    ),
}
PART_START = 63  # sectors: the old DOS start, not 4 KiB-aligned
SYSFS = ("discard_granularity", "discard_max_bytes", "discard_zeroes_data", "rotational")


@dataclass
class Guest:
    name: str
    workdir: Path
    dom: Any


def make_image(
    path: Path, label: str, tree: Path | None = None, partition_at: int | None = None
) -> None:
    """ext4 labelled ``label`` on the whole disk, or in one DOS partition from a sector."""
    raw = path.with_suffix(".raw")
    subprocess.run(["truncate", "-s", "64M", str(raw)], check=True)
    extra = ["-d", str(tree)] if tree else []
    if partition_at is not None:
        table = f"start={partition_at}, type=83\n"
        subprocess.run(["sfdisk", "-q", str(raw)], input=table, text=True, check=True)
        extra += ["-E", f"offset={partition_at * 512}"]
    size = [] if partition_at is None else [f"{(64 << 20) // 1024 - 1024}k"]
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, *extra, str(raw), *size], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def tools_tree(root: Path) -> Path:
    """The host's systemctl, the libraries it loads (at their paths) and the fstrim units."""
    systemctl = Path(shutil.which("systemctl") or "/usr/bin/systemctl")
    files = [(systemctl, systemctl.resolve())]
    files += shared_libraries(systemctl)
    files += [(Path(f"/lib/systemd/system/fstrim.{u}"),) * 2 for u in ("service", "timer")]
    for wanted, real in files:
        dest = root / "root" / str(wanted).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)
    return root


def guest_xml(name: str, workdir: Path, appliance: Appliance) -> str:
    spec = GuestSpec(
        appliance,
        scenario={"mode": "agent", "agent": "1", "size": "1"},
        disk=DiskSpec(workdir / "sda.qcow2", "qcow2", "virtio-scsi", "unmap"),
        agent=True,
        memory_mib=256,
    )
    root = etree.fromstring(
        lab_domain_xml(spec, name, RunPaths(workdir), spec.kernel(), appliance.initrd).encode()
    )
    root = _with_qemu_namespace(root)
    devices = root.find("devices")
    template = root.find("devices/disk")
    assert devices is not None and template is not None
    override = etree.SubElement(root, f"{{{QEMU_NS}}}override")
    for target, (bus, props, _) in DISKS.items():
        disk = etree.fromstring(etree.tostring(template))
        disk.find("source").set("file", str(workdir / f"{target}.qcow2"))  # type: ignore[union-attr]
        disk.find("target").attrib.update({"dev": target, "bus": bus})  # type: ignore[union-attr]
        etree.SubElement(disk, "alias", name=f"ua-{target}")
        template.addprevious(disk)
        if props:
            device = etree.SubElement(override, f"{{{QEMU_NS}}}device", alias=f"ua-{target}")
            frontend = etree.SubElement(device, f"{{{QEMU_NS}}}frontend")
            for prop, (kind, value) in props.items():
                etree.SubElement(
                    frontend, f"{{{QEMU_NS}}}property", name=prop, type=kind, value=value
                )
    devices.remove(template)
    # QEMU runs as root: the appliance stays where it is, under /root.
    etree.SubElement(root, "seclabel", type="static", model="dac", relabel="no").append(
        etree.fromstring("<label>+0:+0</label>")
    )
    return etree.tostring(root, encoding="unicode")


def _with_qemu_namespace(root: etree._Element) -> etree._Element:
    """The same element tree, with xmlns:qemu declared on <domain>."""
    attrs = {str(k): str(v) for k, v in root.attrib.items()}
    new = etree.Element(root.tag, attrs, nsmap={"qemu": QEMU_NS})
    new.extend(list(root))
    return new


def virsh_exec(name: str, script: str) -> str:
    """Run ``sh -c script`` in the guest with virsh's own agent path (not vmtrim's)."""

    def agent(message: dict[str, Any]) -> Any:
        out = subprocess.run(
            ["virsh", "-c", "qemu:///system", "qemu-agent-command", name, json.dumps(message)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return json.loads(out)["return"]

    pid = agent(
        {
            "execute": "guest-exec",
            "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True},
        }
    )["pid"]
    for _ in range(600):
        status = agent({"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status["exited"]:
            assert status.get("exitcode") == 0, base64.b64decode(status.get("err-data", ""))
            return base64.b64decode(status.get("out-data", "")).decode()
        time.sleep(0.1)
    raise AssertionError(f"{script!r} did not exit in the guest")


# Mount each disk by its label (the lab's init mounted /dev/sda, but the guest may name
# libvirt's sdb sda: virtio-scsi scans its LUNs in no fixed order), install systemctl and
# the fstrim units from vdb, enable the timer and list only /mnt in /etc/fstab.
SETUP = """set -e
umount /mnt
for t in sda:/mnt sdb:/srv vdb:/opt vdc:/data vdd:/part; do
  mkdir -p "${t#*:}"; mount "$(findfs LABEL=${t%%:*})" "${t#*:}"
done
cd /opt/root
find . -type f | while read -r f; do
  mkdir -p "/${f%/*}"; [ -e "/$f" ] || cp "$f" "/$f"
done
mkdir -p /etc/systemd/system/timers.target.wants
ln -sf /lib/systemd/system/fstrim.timer /etc/systemd/system/timers.target.wants/fstrim.timer
printf 'LABEL=sda /mnt ext4 defaults 0 2\\n' >/etc/fstab
systemctl is-enabled fstrim.timer
"""


@pytest.fixture(scope="module")
def guest(libvirtd: str, appliance: Appliance) -> Iterator[Guest]:
    conn = libvirt.open(libvirtd)
    top = Path(tempfile.mkdtemp(prefix="vmtrim-queue-"))
    top.chmod(0o755)
    tools = tools_tree(top / "tools")
    for target in DISKS:
        make_image(
            top / f"{target}.qcow2",
            target,
            tools if target == "vdb" else None,
            PART_START if target == "vdd" else None,
        )
    name = f"vmtrim-queue-{os.getpid()}"
    dom = None
    ctl: ControlChannel | None = None
    try:
        dom = conn.defineXML(guest_xml(name, top, appliance))
        dom.create()

        def failure(what: str) -> GuestFailed:
            return GuestFailed(f"{what}; serial log: {serial_tail(RunPaths(top).serial)}")

        ctl = ControlChannel.connect(
            RunPaths(top).ctl, timeout=120, alive=dom.isActive, failure=failure
        )
        ctl.expect("ready", 240)
        assert virsh_exec(name, SETUP).strip() == "enabled"
        yield Guest(name, top, dom)
    finally:
        if ctl is not None:
            ctl.close()
        if dom is not None:
            lab_domains.remove(dom)
        shutil.rmtree(top, ignore_errors=True)
        conn.close()


@pytest.fixture(scope="module")
def audited(guest: Guest) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """One `vmtrim audit --json` of the guest: its guest section and each disk's layers."""
    result = vmtrim("audit", "-c", "qemu:///system", guest.name, "--json", timeout=180)
    assert result.returncode == 1, result.stderr  # findings: two disks get no discard
    doc = json.loads(result.stdout)
    [info] = doc["guests"]
    assert info["agent"] is True, info
    layers = {d["target"]: {la["layer"]: la for la in d["layers"]} for d in doc["disks"]}
    return info, layers


def guest_names_of(guest: Guest, label: str) -> tuple[str, str]:
    """The guest kernel's names of the disk and of the partition (or the same disk) that
    hold the filesystem labelled with a libvirt target: (vdc, vdc1), (sda, sda)."""
    part = virsh_exec(guest.name, f"basename $(findfs LABEL={label})").strip()
    disk = virsh_exec(
        guest.name,
        f"c=/sys/class/block/{part}; [ -e $c/partition ] && c=$(dirname $(readlink -f $c));"
        " basename $c",
    ).strip()
    return disk, part


def test_queue_facts_are_what_the_guest_sysfs_reads(
    guest: Guest, audited: tuple[dict[str, Any], dict[str, dict[str, Any]]]
) -> None:
    info, _ = audited
    queues = {q["target"]: q for q in info["queues"]}
    assert set(queues) == set(DISKS)
    alignments = {}
    for target in DISKS:
        dev, part = guest_names_of(guest, target)
        read = virsh_exec(
            guest.name, " ".join(f"cat /sys/block/{dev}/queue/{f};" for f in SYSFS)
        ).split()
        sysfs = dict(zip(SYSFS, (int(v) for v in read), strict=True))
        queue = queues[target]
        assert queue["device"] == dev
        assert {f: queue[f] for f in SYSFS} == {
            **sysfs,
            "rotational": bool(sysfs["rotational"]),
        }
        # The alignment of what holds the filesystem: the partition, or the whole disk.
        for f in ("alignment_offset", "discard_alignment"):
            assert queue[f] == int(virsh_exec(guest.name, f"cat /sys/class/block/{part}/{f}"))
        alignments[target] = (part != dev, queue["alignment_offset"], queue["discard_alignment"])
    # rotation_rate=1 reaches the guest: the one non-rotational disk
    assert {t for t, q in queues.items() if q["rotational"] is False} == {"sda"}
    # sector 63 of 4 KiB blocks and a 4 KiB discard granularity: 7 sectors past a boundary
    assert alignments["vdd"] == (True, 512, 512)
    assert {alignments[t] for t in DISKS if t != "vdd"} == {(False, 0, 0)}


def test_no_discard_in_the_guest_blocks_the_guest_driver(
    audited: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    info, layers = audited
    queues = {q["target"]: q for q in info["queues"]}
    # What the measurement showed on QEMU 7.2 / Linux 6.1 (facts.py rows' `checked`).
    assert (queues["sda"]["discard_granularity"], queues["sda"]["discard_max_bytes"]) == (
        4096,
        1073741824,
    )
    assert queues["sdb"]["discard_max_bytes"] == 0  # scsi-hd discard_granularity=0
    assert queues["vdb"]["discard_max_bytes"] == 0  # virtio-blk discard=false
    assert queues["vdc"]["discard_max_bytes"] > 0  # virtio-blk ignores granularity 0
    for target, queue in queues.items():
        driver = layers[target]["guest_driver"]
        read = f"the guest reads /sys/block/{queue['device']}/queue/discard_max_bytes ="
        if queue["discard_max_bytes"] == 0:
            assert driver["verdict"] == "block", target
            assert driver["reason"] == f"{read} 0: the guest sends this disk no discard at all"
        else:
            assert driver["verdict"] == "pass", target
            assert driver["reason"] == (
                f"{read} {queue['discard_max_bytes']}"
                f" (discard_granularity {queue['discard_granularity']})"
            )


def test_an_fstab_only_timer_skips_what_was_mounted_by_hand(
    audited: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    info, layers = audited
    assert info["fstrim_timer"] is True
    # util-linux 2.38's unit, as Debian 12 ships it
    assert info["fstrim_command"].startswith("/sbin/fstrim --listed-in /etc/fstab:")
    assert info["fstrim_scope"] == "fstab"
    mounted = {fs["target"]: fs for fs in info["filesystems"]}
    assert {t: mounted[t]["mountpoint"] for t in DISKS} == {t: d[2] for t, d in DISKS.items()}
    fs = layers["sda"]["guest_fs"]
    assert (fs["verdict"], fs["reason"]) == (
        "pass",
        "/mnt (ext4): fstrim.timer trims it (it is in /etc/fstab)",
    )
    for target in ("sdb", "vdb", "vdc"):
        mountpoint = DISKS[target][2]
        fs = layers[target]["guest_fs"]
        assert fs["verdict"] == "block", target
        assert fs["reason"] == (
            f"{mountpoint} (ext4) is mounted without discard, and fstrim.timer skips it:"
            f" fstrim.service runs `{info['fstrim_command']}`, which trims only the"
            " filesystems in /etc/fstab"
        )


# The three devices of the measurement on a QEMU command line, as `-device` properties.
DG0_DEVICES = (
    "scsi-hd,drive=d0,bus=scsi0.0,discard_granularity=0",
    "virtio-blk-pci,drive=d1,discard_granularity=0",
    "ide-hd,drive=d2,bus=ide.0,discard_granularity=0",
)


def test_discard_granularity_0_blocks_scsi_hd_and_ide_hd_only(tmp_path: Path) -> None:
    """The device rule follows what the guest above read (facts scsi_dg0, ide_dg0,
    virtio_blk_dg0): 0 turns discard off for scsi-hd and ide-hd, not for virtio-blk."""
    argv = ["qemu-system-x86_64 -machine pc-q35-7.2 -device virtio-scsi-pci,id=scsi0"]
    for n, spec in enumerate(DG0_DEVICES):
        argv.append(
            f"-blockdev driver=file,filename={tmp_path}/{n}.raw,node-name=f{n},discard=unmap"
            f" -blockdev driver=raw,file=f{n},node-name=d{n},discard=unmap -device {spec}"
        )
    args = tmp_path / "qemu.args"
    args.write_text(" ".join(argv))
    result = vmtrim("audit", "--qemu-args", str(args), "--json", "--no-probe")
    assert result.returncode == 1, result.stderr
    device = {
        d["qemu_device"]: next(la for la in d["layers"] if la["layer"] == "device")
        for d in json.loads(result.stdout)["disks"]
    }
    assert device["scsi-hd"]["verdict"] == "block"
    assert device["scsi-hd"]["reason"] == (
        "scsi-hd: discard_granularity=0 clears LBPME: Linux sd turns discard off"
        " (the guest reads discard_max_bytes = 0)"
    )
    assert device["ide-hd"]["verdict"] == "block"
    assert device["ide-hd"]["reason"].startswith("ide-hd: discard_granularity=0 clears the TRIM")
    assert device["virtio-blk-pci"]["verdict"] == "pass"
