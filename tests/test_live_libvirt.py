"""vmtrim trim / audit / fix against the real libvirtd, with the lab guest and its real qemu-ga.

Each domain boots the lab appliance in its ``agent`` scenario: ext4 mounted WITHOUT
discard, N MiB of random data written and deleted, then the guest idles (qemu-ga
running) until the host says "go". Only the host-side trim can give the space back.
Domains run under TCG (<domain type='qemu'>) and are destroyed and undefined in
``finally``, whatever happens.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from helpers import du_bytes, vmtrim
from vmtrim.errors import GuestFailed
from vmtrim.lab import Appliance
from vmtrim.vm.guest import ControlChannel, serial_tail

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
MiB = 1024 * 1024


def make_image(path: Path, size_mib: int) -> None:
    raw = path.with_suffix(".raw")
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def domain_xml(
    name: str,
    workdir: Path,
    appliance: Appliance,
    *,
    discard: bool,
    agent: bool,
    write_mib: int,
    disk: str | None = None,
) -> str:
    """A persistent lab domain; ``disk`` replaces the default qcow2 file disk (a <disk>)."""
    driver_discard = " discard='unmap'" if discard else ""
    disk = disk or (
        "<disk type='file' device='disk'>\n"
        f"      <driver name='qemu' type='qcow2'{driver_discard}/>\n"
        f"      <source file='{workdir}/disk.qcow2'/>\n"
        "      <target dev='sda' bus='scsi'/>\n"
        "    </disk>"
    )
    cmdline = (
        f"console=ttyS0 panic=-1 quiet vmtrim.mode=agent vmtrim.agent={int(agent)}"
        f" vmtrim.size={write_mib}"
    )
    agent_channel = (
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        if agent
        else ""
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>{appliance.kernel}</kernel>
    <initrd>{appliance.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {disk}
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <serial type='file'><source path='{workdir}/serial.log'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{workdir}/ctl.sock'/>
      <target type='virtio' name='org.vmtrim.ctl'/>
    </channel>
    {agent_channel}
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


@dataclass
class LabDomain:
    """One persistent libvirt domain running the lab guest, driven over its control port."""

    name: str
    workdir: Path
    dom: Any
    write_mib: int
    ctl: ControlChannel | None = None
    steps: list[str] = field(default_factory=list)

    @property
    def image(self) -> Path:
        return self.workdir / "disk.qcow2"

    def connect(self) -> None:
        serial = self.workdir / "serial.log"
        # vmtrim.vm.guest is changing from (subject, serial) to a failure callback; accept both.
        if "failure" in inspect.signature(ControlChannel.connect).parameters:
            how: dict[str, Any] = {
                "failure": lambda what: GuestFailed(
                    f"{what}; serial log: {serial_tail(serial)}", subject=self.name
                )
            }
        else:
            how = {"subject": self.name, "serial": serial}
        self.ctl = ControlChannel.connect(
            self.workdir / "ctl.sock", timeout=120, alive=lambda: bool(self.dom.isActive()), **how
        )

    def until_deleted(self) -> None:
        """ready -> go -> written -> go -> deleted: the space is free in the guest only."""
        assert self.ctl is not None
        self.ctl.expect("ready", 180)
        self.ctl.go()
        self.ctl.expect("written", 180)
        self.ctl.go()
        self.ctl.expect("deleted", 180)

    def agent(self, command: dict[str, Any], timeout: int = 10) -> Any:
        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(command), timeout, 0))[
            "return"
        ]


@pytest.fixture(scope="module")
def conn(libvirtd: str) -> Iterator[Any]:
    connection = libvirt.open(libvirtd)
    try:
        yield connection
    finally:
        connection.close()


class Lab:
    """Creates lab domains and always destroys and undefines them."""

    def __init__(self, conn: Any, appliance: Appliance) -> None:
        self.conn = conn
        self.appliance = appliance
        self.domains: list[LabDomain] = []

    def start(
        self,
        tag: str,
        *,
        discard: bool = True,
        agent: bool = True,
        write_mib: int = 16,
        disk_mib: int = 128,
    ) -> LabDomain:
        name = f"vmtrim-live-{os.getpid()}-{tag}"
        workdir = Path(tempfile.mkdtemp(prefix=f"vl-{tag}-"))
        workdir.chmod(0o755)
        make_image(workdir / "disk.qcow2", disk_mib)
        dom = self.conn.defineXML(
            domain_xml(
                name, workdir, self.appliance, discard=discard, agent=agent, write_mib=write_mib
            )
        )
        lab = LabDomain(name, workdir, dom, write_mib)
        self.domains.append(lab)
        dom.create()
        lab.connect()
        return lab

    def cleanup(self) -> None:
        for lab in self.domains:
            with contextlib.suppress(libvirt.libvirtError):
                if lab.dom.isActive():
                    lab.dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                lab.dom.undefine()
            if lab.ctl is not None:
                lab.ctl.close()
            shutil.rmtree(lab.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(conn: Any, appliance: Appliance) -> Iterator[Lab]:
    labs = Lab(conn, appliance)
    try:
        yield labs
    finally:
        labs.cleanup()


@pytest.fixture(scope="module")
def guests(lab: Lab) -> dict[str, LabDomain]:
    """Four domains booted together: big (200 MiB), small, hung-to-be, and one without agent."""
    started = {
        "big": lab.start("big", write_mib=200, disk_mib=320),
        "small": lab.start("small"),
        "hung": lab.start("hung"),
        "noagent": lab.start("noagent", agent=False),
    }
    for key in ("big", "small", "hung"):
        started[key].until_deleted()
    return started


def trim_json(*args: str) -> tuple[dict[str, Any], float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    result = vmtrim("trim", "-c", "qemu:///system", "--json", *args)
    elapsed = time.monotonic() - start
    assert result.stdout, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.trim/1"
    return doc, elapsed, result


def test_trim_through_libvirt_reclaims_what_du_shows(guests: dict[str, LabDomain]) -> None:
    big = guests["big"]
    du_before = du_bytes(big.image)
    doc, _, result = trim_json(big.name)
    du_after = du_bytes(big.image)
    assert result.returncode == 0, result.stderr
    [dom] = doc["domains"]
    assert (dom["domain"], dom["status"], dom["reason"]) == (big.name, "trimmed", None)
    [disk] = dom["disks"]
    assert (disk["target"], disk["source"]) == ("sda", str(big.image))
    # The host measurement is du's, before and after, to the byte.
    assert (disk["allocated_before"], disk["allocated_after"]) == (du_before, du_after)
    assert disk["reclaimed_bytes"] == du_before - du_after
    assert disk["reclaimed_bytes"] >= 0.99 * 200 * MiB
    # The agent's per-path result is kept (virDomainFSTrim would have dropped it).
    [path] = dom["paths"]
    assert path["path"] == "/mnt" and path["error"] is None
    assert path["trimmed"] >= disk["reclaimed_bytes"]  # an upper bound, as documented
    # The guest saw its discards complete, too.
    assert big.ctl is not None
    big.ctl.go()
    trimmed = big.ctl.expect("trimmed", 60)
    assert int(trimmed["discarded"]) >= 200 * MiB


def test_domain_without_agent_is_skipped_within_timeout(guests: dict[str, LabDomain]) -> None:
    noagent = guests["noagent"]
    doc, elapsed, result = trim_json(noagent.name, "--timeout", "5")
    assert result.returncode == 1
    [dom] = doc["domains"]
    assert dom["status"] == "skipped"
    assert "agent" in dom["reason"]
    assert dom["seconds"] <= 5.5
    assert elapsed < 5 + 15  # the CLI's own start-up is the rest
    assert noagent.dom.isActive()


def test_hung_agent_is_skipped_within_timeout_others_trimmed(guests: dict[str, LabDomain]) -> None:
    hung, small = guests["hung"], guests["small"]
    # Freeze qemu-ga inside the guest: the channel stays open, nothing answers.
    hung.agent(
        {
            "execute": "guest-exec",
            "arguments": {"path": "/bin/sh", "arg": ["-c", "kill -STOP $(pidof qemu-ga)"]},
        }
    )
    time.sleep(1)
    with pytest.raises(libvirt.libvirtError):
        hung.agent({"execute": "guest-ping"}, timeout=2)
    du_before = du_bytes(small.image)
    # --timeout is each domain's whole run, from when its worker starts it. A healthy
    # guest's trim takes well under a second (0.01-0.08 s measured beside the hung one,
    # with the host's load average at 8 on 2 cores), but a TCG guest on a loaded 2-core
    # host can be starved for seconds; 20 s is the margin for that, not a need.
    timeout = 20
    doc, elapsed, result = trim_json(
        hung.name, small.name, "--parallel", "2", "--timeout", str(timeout)
    )
    assert result.returncode == 1
    by_name = {d["domain"]: d for d in doc["domains"]}
    assert [d["domain"] for d in doc["domains"]] == [hung.name, small.name]
    assert by_name[hung.name]["status"] == "skipped"
    assert by_name[hung.name]["reason"]
    assert by_name[hung.name]["seconds"] <= timeout + 0.5
    assert elapsed < timeout + 15  # in parallel: the hung domain's wait is the whole run
    trimmed = by_name[small.name]
    assert trimmed["status"] == "trimmed", trimmed["reason"]  # the reason, if it ever fails
    [disk] = trimmed["disks"]
    assert disk["allocated_before"] == du_before
    assert disk["allocated_after"] == du_bytes(small.image)
    assert disk["reclaimed_bytes"] >= 0.99 * 16 * MiB


def test_fix_through_libvirt_then_restart_then_trim_reclaims(lab: Lab, tmp_path: Path) -> None:
    guest = lab.start("fix", discard=False, write_mib=24)
    guest.until_deleted()
    # Before the fix: the guest trims, QEMU drops the discards (discard unset = ignore).
    # The host got nothing back: no_effect, exit 1, with the layer and the fix command
    # in the audit's own words.
    doc, _, result = trim_json(guest.name)
    [dom] = doc["domains"]
    assert (dom["status"], result.returncode) == ("no_effect", 1), dom["reason"]
    assert dom["paths"][0]["trimmed"] > 24 * MiB
    assert dom["disks"][0]["reclaimed_bytes"] < 0.05 * 24 * MiB
    audit = vmtrim("audit", "-c", "qemu:///system", guest.name, "--json")
    [disk] = json.loads(audit.stdout)["disks"]
    blocking = [
        (layer["layer"], layer["reason"], layer["fix"])
        for layer in disk["layers"]
        if layer["verdict"] == "block" and layer["layer"] != "guest_fs"
    ]
    assert blocking and [(b["layer"], b["reason"], b["fix"]) for b in dom["blockers"]] == blocking
    assert [b["command"] for b in dom["blockers"]] == [f"vmtrim fix -c qemu:///system {guest.name}"]
    # The human table says the same, once there is something to trim again.
    refill(guest, 8)
    human = vmtrim("trim", "-c", "qemu:///system", guest.name)
    assert human.returncode == 1, human.stdout
    assert f"sda: block_node: {blocking[0][1]}" in " ".join(human.stdout.split())

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    dry = vmtrim("fix", "-c", "qemu:///system", guest.name, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "+      <driver name='qemu' type='qcow2' discard='unmap'/>" in dry.stdout
    assert "discard" not in _disk_driver(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert not (tmp_path / "state").exists()  # --dry-run writes nothing, not even a backup

    fixed = vmtrim("fix", "-c", "qemu:///system", guest.name, env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert "full power cycle" in fixed.stderr
    assert "discard='unmap'" in _disk_driver(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    [backup] = (tmp_path / "state" / "vmtrim" / "backups").iterdir()
    assert backup.stat().st_mode & 0o777 == 0o600
    assert "discard" not in _disk_driver(backup.read_text())

    # The live audit says the fix waits for a restart; the guest layer is measured.
    audit = vmtrim("audit", "-c", "qemu:///system", guest.name, "--json")
    report = json.loads(audit.stdout)
    [notes] = [d["notes"] for d in report["domains"]]
    assert any("fix pending a restart" in n and "discard (unset) -> unmap" in n for n in notes)
    [info] = report["guests"]
    assert info["agent"] is True and info["kernel_release"].startswith("6.")
    [fs] = info["filesystems"]
    assert (fs["target"], fs["mountpoint"], fs["fstype"]) == ("sda", "/mnt", "ext4")
    assert "discard" not in fs["mount_options"]

    again = vmtrim(
        "fix", "-c", "qemu:///system", guest.name, "--restart", "--restart-timeout", "60", env=env
    )
    assert again.returncode == 0, again.stderr
    assert "already enabled" in again.stderr and "restarted" in again.stderr
    assert "discard='unmap'" in _disk_driver(guest.dom.XMLDesc(0))  # the running config
    # A new boot of the same disk: write 24 MiB again, delete, trim from the host.
    assert guest.ctl is not None
    guest.ctl.close()
    guest.connect()
    guest.until_deleted()
    doc, _, result = trim_json(guest.name)
    [dom] = doc["domains"]
    assert dom["status"] == "trimmed", result.stderr
    assert dom["disks"][0]["reclaimed_bytes"] >= 0.99 * 24 * MiB


def refill(guest: LabDomain, mib: int) -> None:
    """Write ``mib`` MiB in the guest and delete it again, through the agent (guest-exec)."""
    script = f"dd if=/dev/urandom of=/mnt/refill bs=1048576 count={mib}; sync; rm /mnt/refill; sync"
    pid = guest.agent(
        {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script]}}
    )["pid"]
    deadline = time.monotonic() + 180
    while not guest.agent({"execute": "guest-exec-status", "arguments": {"pid": pid}})["exited"]:
        assert time.monotonic() < deadline, "the refill did not finish"
        time.sleep(0.5)


def _disk_driver(xml: str) -> str:
    start = xml.index("<disk")
    return xml[start : xml.index("</disk>", start)]
