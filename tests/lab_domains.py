"""The lab-guest fixture the run and watch tests share (the guests are test_live_libvirt's).

Import the fixture into a test module (``from lab_domains import lab``); it is
module-scoped there: the guests of one module boot once and are destroyed and
undefined after its last test, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import libvirt
import pytest

from test_live_libvirt import Lab, LabDomain, domain_xml, make_image
from vmtrim.lab import Appliance

# Lab names every guest vmtrim-live-<pid>-<tag>: a policy including this glob selects
# only this session's guests on a libvirtd other sessions share.
OURS = f"vmtrim-live-{os.getpid()}-"


@pytest.fixture(scope="module")
def lab(libvirtd: str, appliance: Appliance) -> Iterator[Lab]:
    conn = libvirt.open(libvirtd)
    labs = Lab(conn, appliance)
    try:
        yield labs
    finally:
        labs.cleanup()
        conn.close()


def disk_xml(target: str, image: Path) -> str:
    bus = "scsi" if target.startswith("sd") else "virtio"
    return (
        "<disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2' discard='unmap'/>"
        f"<source file='{image}'/><target dev='{target}' bus='{bus}'/></disk>"
    )


def define(
    lab: Lab, tag: str, work: Path, write_mib: int, sda_mib: int, data: Mapping[str, Path]
) -> LabDomain:
    """Defines the lab guest OURS+TAG in WORK, discard and the agent on: its own disk is
    WORK/disk.qcow2 (SDA_MIB, made here) on SCSI sda, then DATA's images (target -> image,
    in that order). The Lab destroys and undefines it."""
    make_image(work / "disk.qcow2", sda_mib)
    disks = disk_xml("sda", work / "disk.qcow2") + "".join(disk_xml(t, p) for t, p in data.items())
    name = f"{OURS}{tag}"
    xml = domain_xml(
        name, work, lab.appliance, discard=True, agent=True, write_mib=write_mib, disk=disks
    )
    lab_dom = LabDomain(name, work, lab.conn.defineXML(xml), write_mib)
    lab.domains.append(lab_dom)
    return lab_dom


def boot(lab_dom: LabDomain) -> None:
    """Starts the guest and waits until it has written and deleted its data (free in the
    guest only); its agent answers from then on."""
    lab_dom.dom.create()
    lab_dom.connect()
    lab_dom.until_deleted()


def remove(dom: Any) -> None:
    """Destroys (if running) and undefines a libvirt domain, whatever state it is in."""
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()
