"""Live libvirt domains: their guest agent, their disks as the host sees them, their facts.

:class:`LibvirtAgent` sends agent commands with ``libvirt_qemu.qemuAgentCommand``
(libvirt does the guest-sync), with a timeout, and sorts libvirt's errors into
"no agent / not answering" (the domain is skipped) and "the agent said no" (it
failed). :class:`DomainTarget` is what :mod:`vmtrim.trim` trims.
"""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Any

from vmtrim.agent import ExecStatus, FstrimResult, parse_fstrim
from vmtrim.allocation import allocated_bytes
from vmtrim.connect import Connection, error_code, error_text, libvirt_module, libvirt_qemu_module
from vmtrim.libvirt_xml import parse_domain_xml
from vmtrim.model import DeviceType, Disk, StorageKind
from vmtrim.trim import NOT_RUNNING, AgentFailed, AgentUnavailable, DiskRef


def _unavailable_codes(libvirt: Any) -> set[int]:
    names = ("VIR_ERR_OPERATION_INVALID",  # not running, agent not configured/connected
             "VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED",
             "VIR_ERR_ARGUMENT_UNSUPPORTED", "VIR_ERR_OPERATION_TIMEOUT",
             "VIR_ERR_AGENT_COMMAND_TIMEOUT", "VIR_ERR_NO_DOMAIN")
    return {getattr(libvirt, n) for n in names if hasattr(libvirt, n)}


class LibvirtAgent:
    """The guest agent of one libvirt domain, through ``qemuAgentCommand``."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom

    def execute(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        """One agent command; its ``return`` value."""
        libvirt = libvirt_module()
        libvirt_qemu = libvirt_qemu_module()
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        # libvirt takes whole seconds; our own deadline (trim.call_with_deadline) is exact.
        seconds = max(1, math.ceil(timeout))
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(message), seconds, 0)
        except libvirt.libvirtError as exc:
            text = error_text(exc)
            if error_code(exc) in _unavailable_codes(libvirt):
                raise AgentUnavailable(text) from exc
            raise AgentFailed(f"{command}: {text}") from exc
        try:
            return json.loads(reply).get("return")
        except (ValueError, AttributeError) as exc:
            raise AgentFailed(f"{command}: unreadable reply {reply!r:.80}") from exc

    def fstrim(self, minimum: int, timeout: float) -> FstrimResult:
        return parse_fstrim(self.execute("guest-fstrim", {"minimum": minimum}, timeout))

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus:
        deadline = time.monotonic() + timeout
        started = self.execute("guest-exec", {"path": path, "arg": args,
                                              "capture-output": True}, timeout)
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise AgentFailed(f"guest-exec returned {started!r:.80}")
        while True:
            ret = self.execute("guest-exec-status", {"pid": pid}, deadline - time.monotonic())
            if not isinstance(ret, dict):
                raise AgentFailed(f"guest-exec-status returned {ret!r:.80}")
            if ret.get("exited"):
                return ExecStatus(
                    exited=True, exitcode=ret.get("exitcode"), signal=ret.get("signal"),
                    out_data=base64.b64decode(ret.get("out-data", "")),
                    err_data=base64.b64decode(ret.get("err-data", "")))
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"{path} did not exit within {timeout:.3g} s")
            time.sleep(0.05)


def domain_xml(dom: Any, inactive: bool = False, secure: bool = False) -> str:
    libvirt = libvirt_module()
    flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
        libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
    try:
        return str(dom.XMLDesc(flags))
    except libvirt.libvirtError as exc:
        raise AgentFailed(f"cannot read the domain XML: {error_text(exc)}") from exc


def measurable(disk: Disk) -> bool:
    """Writable disks with a host source: the ones whose allocation can change on trim."""
    return (disk.device in (DeviceType.DISK, DeviceType.LUN) and not disk.read_only
            and disk.storage is not StorageKind.NONE and disk.target is not None)


class DomainTarget:
    """A running libvirt domain, trimmed through its agent and measured on the host."""

    def __init__(self, conn: Connection, dom: Any) -> None:
        self.conn = conn
        self.dom = dom
        self.name = str(dom.name())

    def skip_reason(self) -> str | None:
        libvirt = libvirt_module()
        try:
            active = bool(self.dom.isActive())
        except libvirt.libvirtError as exc:
            return f"cannot query the domain: {error_text(exc)}"
        return None if active else NOT_RUNNING

    def disks(self) -> list[DiskRef]:
        domain = parse_domain_xml(domain_xml(self.dom), subject=self.name)
        refs = []
        for disk in domain.disks:
            if not measurable(disk):
                continue
            local = (disk.source if self.conn.local and disk.storage is StorageKind.FILE
                     else None)
            refs.append(DiskRef(target=disk.target or disk.ident, source=disk.source,
                                local_file=local))
        return refs

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        if disk.local_file:
            return allocated_bytes(disk.local_file), "du"
        # Block devices and remote hosts: libvirt knows the allocation, we cannot stat it.
        return int(self.dom.blockInfo(disk.target)[1]), "blockInfo"

    def agent(self, timeout: float) -> LibvirtAgent:
        return LibvirtAgent(self.dom)

    def unmap_counters(self) -> dict[str, tuple[int, int]] | None:
        # libvirt's block stats have no unmap counters; they come only over --qmp.
        return None
