"""A loop device as a libvirt ``type='block'`` disk, for real: a raw ext4 image attached
to /dev/loopN on this host, given to a lab guest through libvirtd; the guest deletes a
file, ``vmtrim trim`` trims it through the agent, and the loop's backing file shrinks.
The audit follows the disk down both layers, and the guest's queue is read through
LibvirtAgent by the same Runner the probes use."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from helpers import du_bytes, vmtrim
from storage_support import loop_device
from test_live_libvirt import domain_xml as lab_domain
from vmtrim.channels.libvirt import LibvirtAgent
from vmtrim.errors import GuestFailed
from vmtrim.lab import Appliance
from vmtrim.storage.runner import AgentRunner
from vmtrim.vm.guest import ControlChannel

MiB = 1 << 20
WRITE_MIB = 64


def domain_xml(name: str, work: Path, device: str, appliance: Appliance) -> str:
    """The live tests' lab domain, with the loop device as its raw block disk."""
    disk = (
        "<disk type='block' device='disk'>\n"
        "      <driver name='qemu' type='raw' discard='unmap'/>\n"
        f"      <source dev='{device}'/>\n"
        "      <target dev='sda' bus='scsi'/>\n"
        "    </disk>"
    )
    return lab_domain(
        name, work, appliance, discard=True, agent=True, write_mib=WRITE_MIB, disk=disk
    )


@dataclass
class LoopGuest:
    name: str
    uri: str
    device: str
    backing: Path
    dom: Any
    ctl: ControlChannel


@pytest.fixture(scope="module")
def guest(libvirtd: str, appliance: Appliance) -> Iterator[LoopGuest]:
    work = Path(tempfile.mkdtemp(prefix="vl-loop-"))
    work.chmod(0o755)
    backing = work / "disk.raw"
    subprocess.run(["truncate", "-s", "256M", str(backing)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(backing)], check=True)
    conn = libvirt.open(libvirtd)
    name = f"vmtrim-loop-{os.getpid()}"
    dom = None
    try:
        with loop_device(backing) as device:
            dom = conn.defineXML(domain_xml(name, work, device, appliance))
            dom.create()
            ctl = ControlChannel.connect(
                work / "ctl.sock",
                failure=lambda what: GuestFailed(what, subject=name),
                alive=lambda: bool(dom.isActive()),
                timeout=120,
            )
            try:
                yield LoopGuest(name, libvirtd, device, backing, dom, ctl)
            finally:
                ctl.close()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
    finally:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


def test_trim_reclaims_on_the_loops_backing_file(guest: LoopGuest) -> None:
    guest.ctl.expect("ready", 240)
    guest.ctl.go()
    written = guest.ctl.expect("written", 240)
    guest.ctl.go()
    guest.ctl.expect("deleted", 240)
    full = du_bytes(guest.backing)
    result = vmtrim("trim", "-c", guest.uri, "--json", guest.name)
    assert result.returncode in (0, 1), result.stderr
    empty = du_bytes(guest.backing)
    print(f"loop backing file: {full} -> {empty} B (written {written.get('bytes')} B)")
    assert full - empty >= WRITE_MIB * MiB * 3 // 4, (full, empty, result.stdout)


def test_the_guest_sees_a_discarding_disk_through_libvirts_agent(guest: LoopGuest) -> None:
    runner = AgentRunner(LibvirtAgent(guest.dom), guest.name)
    max_bytes = runner.read("/sys/block/sda/queue/discard_max_bytes")
    assert max_bytes is not None and int(max_bytes) > 0
    missing = runner.run(["/nonexistent-vmtrim-tool"], timeout=20)
    assert not missing.ok and missing.why().startswith("/nonexistent-vmtrim-tool")


def test_audit_reports_the_loop_and_its_file(guest: LoopGuest) -> None:
    result = vmtrim("audit", "-c", guest.uri, "--json", guest.name)
    assert result.returncode in (0, 1), result.stderr
    (disk,) = json.loads(result.stdout)["disks"]
    host = next(layer for layer in disk["layers"] if layer["layer"] == "host_storage")
    assert host["verdict"] == "pass"
    assert f"{Path(guest.device).name} passes discards" in host["reason"]
    assert f"backed by {guest.backing}" in host["reason"] and "punches holes" in host["reason"]
