"""Run the lab guest as a transient libvirt domain (``vmtrim verify --connect URI``).

The domain XML is generated here: direct kernel boot (``<kernel>``, ``<initrd>``,
``<cmdline>``), the test disk with ``<driver discard=...>``, the serial console to a
file, the control port ``org.vmtrim.ctl`` as a unix channel, and the guest agent
channel ``org.qemu.guest_agent.0`` that libvirt itself connects to (agent commands
go through ``qemuAgentCommand``). The domain is created with ``createXML`` (so it
disappears when it stops) and destroyed in ``finally``.

libvirt runs QEMU as its own user (the DAC base label, e.g. libvirt-qemu). That
user cannot reach files under ``/root``, and QEMU must create the control socket,
so the work directory is handed to that user and the kernel and initrd are copied
into it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from lxml import etree

from vmtrim._util.domxml import DiskElement
from vmtrim._util.safexml import xml_parser
from vmtrim._util.versions import format_version, from_libvirt
from vmtrim.channels.libvirt import LibvirtAgent, libvirt_module, libvirt_qemu_module
from vmtrim.channels.qmp import FstrimResult
from vmtrim.errors import AgentUnavailable, EnvironmentProblem, GuestFailed
from vmtrim.vm.guest import (
    AGENT_PORT,
    CTL_PORT,
    Boot,
    GuestBase,
    GuestSpec,
    RunPaths,
    launching,
)

# libvirt <target bus=...> and device name for each verify bus.
TARGETS = {
    "ide": ("ide", "hda"),
    "sata": ("sata", "sda"),
    "virtio-scsi": ("scsi", "sda"),
    "virtio-blk": ("virtio", "vda"),
}


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    el = etree.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def lab_domain_xml(spec: GuestSpec, name: str, paths: RunPaths, kernel: Path, initrd: Path) -> str:
    """The transient domain for one lab guest (``<domain type='qemu'>`` under TCG)."""
    dom = etree.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(dom, "name", name)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", "1")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    _sub(os_el, "kernel", str(kernel))
    _sub(os_el, "initrd", str(initrd))
    _sub(os_el, "cmdline", spec.cmdline())
    _sub(_sub(dom, "features"), "acpi")  # poweroff -f ends the VM through ACPI S5
    if spec.accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")
    devices = _sub(dom, "devices")
    if spec.disk is not None:
        bus, dev = TARGETS[spec.disk.bus]
        if spec.disk.bus == "virtio-scsi":
            _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
        elif spec.disk.bus == "sata":
            _sub(devices, "controller", type="sata", index="0")
        disk = DiskElement.new(devices, type="file", device="disk")
        disk.update(
            (DiskElement.driver_name, "qemu"),
            (DiskElement.driver_type, spec.disk.format),
            (DiskElement.driver_discard, spec.disk.discard),
            (DiskElement.source_file, str(spec.disk.path)),
            (DiskElement.target_dev, dev),
            (DiskElement.target_bus, bus),
        )
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(paths.serial))
    _sub(serial, "target", port="0")
    if spec.control:
        ctl = _sub(devices, "channel", type="unix")
        _sub(ctl, "source", mode="bind", path=str(paths.ctl))
        _sub(ctl, "target", type="virtio", name=CTL_PORT)
    if spec.agent:
        agent = _sub(devices, "channel", type="unix")
        _sub(agent, "target", type="virtio", name=AGENT_PORT)  # libvirt picks the path
    _sub(devices, "memballoon", model="none")
    return etree.tostring(dom, pretty_print=True, encoding="unicode")


QEMU_USERS = ("libvirt-qemu", "qemu")  # Debian/Ubuntu, Fedora/RHEL/SUSE


def _qemu_owner() -> tuple[int, int] | None:
    """uid:gid libvirt's system instance runs QEMU as.

    (The capabilities XML names it too, but getCapabilities can take minutes on a
    host without dmidecode.)
    """
    for name in QEMU_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    return None


class LibvirtGuest(GuestBase):
    """A lab guest as a transient domain; destroyed on exit, whatever happened."""

    def __init__(
        self,
        uri: str,
        spec: GuestSpec,
        workdir: Path,
        *,
        subject: str = "vm",
        connect_timeout: float = 30.0,
    ) -> None:
        super().__init__(spec, workdir, subject=subject, connect_timeout=connect_timeout)
        self.uri = uri
        self.name = f"vmtrim-lab-{uuid.uuid4().hex[:12]}"
        self._conn: Any = None
        self._dom: Any = None
        self._libvirt = libvirt_module()

    def start(self) -> None:
        lv = self._libvirt
        try:
            self._conn = lv.open(self.uri)
        except lv.libvirtError as exc:
            raise EnvironmentProblem(
                f"cannot connect: {exc.get_error_message()}", subject=self.uri
            ) from exc
        workdir = self.paths.workdir
        kernel = workdir / self.spec.kernel().name
        initrd = workdir / "initrd.img"
        shutil.copyfile(self.spec.kernel(), kernel)
        shutil.copyfile(self.spec.appliance.initrd, initrd)
        owner = _qemu_owner()
        if owner is not None:
            os.chown(workdir, *owner)
        workdir.chmod(0o750)
        xml = lab_domain_xml(self.spec, self.name, self.paths, kernel, initrd)
        try:
            with launching():
                self._dom = self._conn.createXML(xml, 0)
        except lv.libvirtError as exc:
            raise GuestFailed(
                f"libvirt did not start the domain: {exc.get_error_message()}", subject=self.subject
            ) from exc
        self._connect_ctl()

    def alive(self) -> bool:
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except self._libvirt.libvirtError:
            return False  # a transient domain that stopped no longer exists

    def _stop(self) -> None:
        lv = self._libvirt
        if self._dom is None and self._conn is not None:
            # Interrupted while createXML ran: the domain may exist without our handle.
            with contextlib.suppress(lv.libvirtError):
                self._dom = self._conn.lookupByName(self.name)
        if self._dom is not None and self.alive():
            with contextlib.suppress(lv.libvirtError):
                self._dom.destroy()
        if self._conn is not None:
            with contextlib.suppress(lv.libvirtError):
                self._conn.close()
            self._conn = None

    def info(self) -> dict[str, Any]:
        machine = self.spec.machine
        with contextlib.suppress(self._libvirt.libvirtError):
            tree = etree.fromstring(self._dom.XMLDesc(0).encode(), xml_parser())
            type_el = tree.find("os/type")
            if type_el is not None:  # libvirt expands the alias: pc -> pc-i440fx-7.2
                machine = type_el.get("machine") or machine
        return {
            "qemu_version": format_version(from_libvirt(int(self._conn.getVersion()))),
            "machine": machine,
            "accel": self._measured_accel(),
            "libvirt_version": format_version(from_libvirt(int(self._conn.getLibVersion()))),
            "domain": self.name,
        }

    def _measured_accel(self) -> str:
        """What the running QEMU says (query-kvm through libvirt), not what was asked for."""
        try:
            reply = libvirt_qemu_module().qemuMonitorCommand(
                self._dom, json.dumps({"execute": "query-kvm"}), 0
            )
            enabled = json.loads(reply)["return"]["enabled"]
        except (self._libvirt.libvirtError, ValueError, KeyError, TypeError):
            return "unknown"
        return "kvm" if enabled is True else "tcg"

    def agent_fstrim(self, minimum: int = 0, timeout: float = 30.0) -> FstrimResult:
        """guest-fstrim through libvirt; retried while the agent is not there yet."""
        agent = LibvirtAgent(self._dom)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return agent.fstrim(minimum, timeout=300.0)
            except AgentUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise self.failure(f"the guest did not power off within {timeout:g} s")
            time.sleep(0.1)


def booter(uri: str) -> Boot:
    """The runner verify uses: (spec, workdir, subject) -> a LibvirtGuest context manager."""

    def boot(spec: GuestSpec, workdir: Path, subject: str) -> LibvirtGuest:
        return LibvirtGuest(uri, spec, workdir, subject=subject)

    return boot
