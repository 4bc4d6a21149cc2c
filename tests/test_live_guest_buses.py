"""`vmtrim audit -c` maps the guest's filesystems to the right host disk on every bus.

Three lab guests run at once on the real libvirtd (TCG), each with qemu-ga and its
/mnt on one of two devices of the same bus, laid out so that a match by name, by XML
order or by bus and unit alone picks the wrong one: virtio-blk 'vdb' sits in an
earlier PCI slot than 'vda' (the guest calls it vda); SATA has a CD-ROM on port 0
of the first AHCI controller and the disk on port 0 of a second one; IDE uses the
second channel, master and slave. Each ext4 is labelled with its target, so the
guest's own bytes say which disk it mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from lxml import etree

from vmtrim.channels.libvirt import LibvirtAgent
from vmtrim.errors import GuestFailed
from vmtrim.lab import Appliance, ensure_appliance
from vmtrim.vm.guest import ControlChannel, DiskSpec, GuestSpec, RunPaths, serial_tail
from vmtrim.vm.libvirt import lab_domain_xml

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]


@dataclass(frozen=True)
class Layout:
    """One guest: its machine, scenario, and disks (target dev, <address>, device)."""

    bus: str  # a vmtrim.vm.guest bus name
    machine: str
    mode: str  # lab scenario: online mounts with -o discard, agent without
    disks: tuple[tuple[str, dict[str, str], str], ...]
    controllers: int = 1


def _pci(slot: int) -> dict[str, str]:
    return {"type": "pci", "domain": "0", "bus": "0", "slot": str(slot), "function": "0"}


def _drive(bus: int, unit: int, controller: int = 0) -> dict[str, str]:
    return {
        "type": "drive",
        "controller": str(controller),
        "bus": str(bus),
        "target": "0",
        "unit": str(unit),
    }


LAYOUTS = {
    # The guest probes PCI slot 5 first: its vda is libvirt's vdb.
    "virtio-blk": Layout(
        "virtio-blk", "pc", "agent", (("vda", _pci(10), "disk"), ("vdb", _pci(5), "disk"))
    ),
    # Two AHCI controllers, port 0 on each: a CD-ROM on the first, the disk on the second.
    "sata": Layout(
        "sata",
        "pc-q35-7.2",
        "online",
        (("sda", _drive(0, 0), "cdrom"), ("sdb", _drive(0, 0, 1), "disk")),
        controllers=2,
    ),
    # q35 has no IDE: the lab's default machine, pc (PIIX), has two channels.
    "ide": Layout(
        "ide", "pc", "agent", (("hdd", _drive(1, 1), "disk"), ("hdc", _drive(1, 0), "disk"))
    ),
}


@dataclass
class Guest:
    layout: Layout
    name: str
    workdir: Path
    dom: Any
    ready: dict[str, str]

    def failure(self, what: str) -> GuestFailed:
        serial = RunPaths(self.workdir).serial
        return GuestFailed(f"{what}; serial log: {serial_tail(serial)}", subject=self.name)

    def agent(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(message), 30, 0)
        return json.loads(reply)["return"]


def guest_xml(layout: Layout, name: str, workdir: Path, appliance: Appliance) -> str:
    """The lab's libvirt domain for this bus, with the layout's disks and addresses."""
    spec = GuestSpec(
        appliance,
        scenario={"mode": layout.mode, "agent": "1", "size": "1"},
        disk=DiskSpec(workdir / "disk.qcow2", "qcow2", layout.bus, "unmap"),
        agent=True,
        machine=layout.machine,
        memory_mib=256,
    )
    root = etree.fromstring(
        lab_domain_xml(spec, name, RunPaths(workdir), spec.kernel(), appliance.initrd).encode()
    )
    template = root.find("devices/disk")
    assert template is not None
    for dev, address, device in layout.disks:
        disk = etree.fromstring(etree.tostring(template))
        disk.set("device", device)
        source = disk.find("source")
        assert source is not None
        if device == "disk":
            source.set("file", str(image(workdir, dev)))
        else:  # an empty tray
            disk.remove(source)
            disk.remove(disk.find("driver"))  # type: ignore[arg-type]
        disk.find("target").set("dev", dev)  # type: ignore[union-attr]
        etree.SubElement(disk, "serial").text = f"vmtrim-{dev}"
        etree.SubElement(disk, "address", address)
        template.addprevious(disk)
    for index in range(1, layout.controllers):
        template.addprevious(etree.Element("controller", type="sata", index=str(index)))
    template.getparent().remove(template)  # type: ignore[union-attr]
    # QEMU runs as root: the appliance stays where it is, under /root.
    etree.SubElement(root, "seclabel", type="static", model="dac", relabel="no").append(
        etree.fromstring("<label>+0:+0</label>")
    )
    return etree.tostring(root, encoding="unicode")


def image(workdir: Path, dev: str) -> Path:
    return workdir / f"{dev}.qcow2"


def make_image(path: Path, label: str) -> None:
    """ext4 labelled with the disk's target: the guest reads back which disk it mounted."""
    raw = path.with_suffix(".raw")
    subprocess.run(["truncate", "-s", "64M", str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


@pytest.fixture(scope="module")
def guests(libvirtd: str) -> Iterator[dict[str, Guest]]:
    """The three guests, booted together, each idle at 'ready' with /mnt mounted."""
    conn = libvirt.open(libvirtd)
    appliance = ensure_appliance()
    started: dict[str, Guest] = {}
    top = Path(tempfile.mkdtemp(prefix="vmtrim-buses-"))
    top.chmod(0o755)
    channels: list[ControlChannel] = []
    try:
        for bus, layout in LAYOUTS.items():
            name = f"vmtrim-buses-{os.getpid()}-{bus}"
            workdir = top / bus
            workdir.mkdir()
            for dev, _, device in layout.disks:
                if device == "disk":
                    make_image(image(workdir, dev), dev)
            dom = conn.defineXML(guest_xml(layout, name, workdir, appliance))
            started[bus] = Guest(layout, name, workdir, dom, {})
            dom.create()
        for guest in started.values():
            ctl = ControlChannel.connect(
                RunPaths(guest.workdir).ctl,
                timeout=120,
                alive=guest.dom.isActive,
                failure=guest.failure,
            )
            channels.append(ctl)
            guest.ready = ctl.expect("ready", 180)
        yield started
    finally:
        for ctl in channels:
            ctl.close()
        for guest in started.values():
            with contextlib.suppress(libvirt.libvirtError):
                if guest.dom.isActive():
                    guest.dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                guest.dom.undefine()
        shutil.rmtree(top, ignore_errors=True)
        conn.close()


# The label of the filesystem on /mnt: the target of the host disk the guest mounted.
MOUNTED_LABEL = (
    "dev=$(awk '$2 == \"/mnt\" {print $1}' /proc/mounts); "
    "for l in vda vdb sda sdb hdc hdd; do "
    '[ "$(findfs LABEL=$l 2>/dev/null)" = "$dev" ] && echo $l; done; true'
)
# What udev's 60-persistent-storage.rules record for a virtio disk (ID_SERIAL from the
# serial attribute); the lab guest runs no udevd, and qemu-ga reads serials from udev.
UDEV_SERIALS = (
    "mkdir -p /run/udev/data; for d in /sys/block/vd*; do "
    'echo "E:ID_SERIAL=$(cat $d/serial)" >/run/udev/data/b$(cat $d/dev); done'
)


def in_guest(guest: Guest, script: str) -> str:
    status = LibvirtAgent(guest.dom).run("/bin/sh", ["-c", script], 30)
    assert status.exitcode == 0, status.err_data
    return status.out_data.decode().strip()


def audit(guest: Guest) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The audit document's guest section, and each disk's layers by target."""
    result = subprocess.run(
        [sys.executable, "-m", "vmtrim", "audit", "-c", "qemu:///system", guest.name, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.audit/1"
    [info] = doc["guests"]
    assert info["domain"] == guest.name and info["agent"] is True, info
    layers = {d["target"]: {la["layer"]: la for la in d["layers"]} for d in doc["disks"]}
    return info, layers


@pytest.mark.parametrize("bus", list(LAYOUTS))
def test_guest_filesystem_maps_to_its_host_disk(guests: dict[str, Guest], bus: str) -> None:
    guest = guests[bus]
    mounted = in_guest(guest, MOUNTED_LABEL)  # the disk's own bytes say which one it is
    info, layers = audit(guest)
    [fs] = info["filesystems"]
    assert (fs["target"], fs["mountpoint"], fs["fstype"]) == (mounted, "/mnt", "ext4")
    with_discard = guest.layout.mode == "online"
    assert ("discard" in fs["mount_options"]) is with_discard
    assert info["fstrim_timer"] is False  # busybox: no systemd
    verdict = layers[mounted]["guest_fs"]
    if with_discard:
        assert (verdict["verdict"], verdict["reason"]) == (
            "pass",
            "/mnt (ext4) is mounted with discard",
        )
    else:
        assert verdict["verdict"] == "block"
        assert "/mnt (ext4) is mounted without discard" in verdict["reason"]
    for target in set(layers) - {mounted}:
        assert layers[target]["guest_fs"]["reason"] == (
            "the guest reports no mounted filesystem on this disk"
        )


def test_virtio_blk_uses_the_guest_kernel(guests: dict[str, Guest]) -> None:
    guest = guests["virtio-blk"]
    info, layers = audit(guest)
    uname = guest.ready["kernel"]  # `uname -r` in the guest, over the control port
    assert info["kernel_release"] == uname
    version = ".".join(uname.split("-")[0].split(".")[:3])
    mounted = in_guest(guest, MOUNTED_LABEL)
    for target in ("vda", "vdb"):
        driver = layers[target]["guest_driver"]
        assert driver["verdict"] == "pass"
        if target == mounted:  # its sysfs queue is read in the guest: that is the proof
            assert "queue/discard_max_bytes = 2147483136" in driver["reason"]
        else:  # no filesystem, no queue read: the kernel-version rule
            assert f"guest Linux {version} >= " in driver["reason"]


def test_virtio_blk_serial_from_udev(guests: dict[str, Guest]) -> None:
    guest = guests["virtio-blk"]
    mounted = in_guest(guest, MOUNTED_LABEL)
    in_guest(guest, UDEV_SERIALS)
    [fsinfo] = guest.agent("guest-get-fsinfo")
    [disk] = fsinfo["disk"]
    assert disk["serial"] == f"vmtrim-{mounted}"  # qemu-ga now reports the serial
    info, _ = audit(guest)
    [fs] = info["filesystems"]
    assert (fs["target"], fs["mountpoint"]) == (mounted, "/mnt")
