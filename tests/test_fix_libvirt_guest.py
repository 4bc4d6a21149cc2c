"""`vmtrim fix -c` on a running lab guest under the real libvirtd (TCG).

The guest runs qemu-ga, has /dev/vda (virtio-blk on machine pc-i440fx-3.1, which
turns virtio-blk discard off) mounted on /mnt without discard, and its init does
not handle the ACPI power button. So `fix -c --bus scsi` must move vda, read the
guest through its agent as `audit -c` does, and name the /etc/fstab line that
mounts /dev/vda; and `--restart` must wait for a guest that ignores ACPI (once its
agent is gone), then with `--force` destroy and start it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
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
from test_live_guest_buses import make_image
from vmtrim.channels.libvirt import LibvirtAgent
from vmtrim.errors import AgentUnavailable, GuestFailed
from vmtrim.lab import ensure_appliance
from vmtrim.vm.guest import ControlChannel, DiskSpec, GuestSpec, RunPaths, serial_tail
from vmtrim.vm.libvirt import lab_domain_xml

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]

URI = "qemu:///system"
FSTAB = "/dev/vda /mnt ext4 defaults 0 0\nUUID=0bad-cafe /srv ext4 defaults 0 2\n"


@dataclass
class Guest:
    name: str
    workdir: Path
    dom: Any

    def run(self, script: str) -> str:
        status = LibvirtAgent(self.dom).run("/bin/sh", ["-c", script], 30)
        assert status.exitcode == 0, status.err_data
        return status.out_data.decode()


@pytest.fixture(scope="module")
def guest(libvirtd: str) -> Iterator[Guest]:
    conn = libvirt.open(libvirtd)
    appliance = ensure_appliance()
    workdir = Path(tempfile.mkdtemp(prefix="vmtrim-fixg-"))
    workdir.chmod(0o755)
    name = f"vmtrim-fixg-{os.getpid()}"
    disk = workdir / "vda.qcow2"
    make_image(disk, "vda")
    spec = GuestSpec(
        appliance,
        scenario={"mode": "agent", "agent": "1", "size": "1"},
        disk=DiskSpec(disk, "qcow2", "virtio-blk", "ignore"),
        agent=True,
        machine="pc-i440fx-3.1",
        memory_mib=256,
    )
    root = etree.fromstring(
        lab_domain_xml(spec, name, RunPaths(workdir), spec.kernel(), appliance.initrd).encode()
    )
    # QEMU runs as root: the appliance stays where it is, under /root.
    etree.SubElement(root, "seclabel", type="static", model="dac", relabel="no").append(
        etree.fromstring("<label>+0:+0</label>")
    )
    dom = conn.defineXML(etree.tostring(root, encoding="unicode"))
    ctl: ControlChannel | None = None
    try:
        dom.create()

        def failure(what: str) -> GuestFailed:
            tail = serial_tail(RunPaths(workdir).serial)
            return GuestFailed(f"{what}; serial log: {tail}", subject=name)

        ctl = ControlChannel.connect(
            RunPaths(workdir).ctl, timeout=120, alive=dom.isActive, failure=failure
        )
        ctl.expect("ready", 240)
        wait_for_agent(dom, 120)  # libvirt sees the agent's port open a moment later
        yield Guest(name, workdir, dom)
    finally:
        if ctl is not None:
            ctl.close()
        lab_domains.remove(dom)
        shutil.rmtree(workdir, ignore_errors=True)
        conn.close()


def defined(guest: Guest, *, inactive: bool = True) -> etree._Element:
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return etree.fromstring(guest.dom.XMLDesc(flags).encode())


def test_dry_run_reads_the_agent_and_names_the_fstab_line(guest: Guest) -> None:
    guest.run(f"printf '{FSTAB}' >/etc/fstab")
    before = etree.tostring(defined(guest))
    result = vmtrim("fix", "-c", URI, guest.name, "--bus", "scsi", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [doc] = json.loads(result.stdout)["domains"]
    moved = {c["old"]: c["new"] for c in doc["changes"] if c["setting"] == "target"}
    assert list(moved) == ["vda"]
    fstab = [w for w in doc["warnings"] if "/etc/fstab line" in w]
    assert len(fstab) == 1
    assert "line 1 mounts /dev/vda" in fstab[0] and "UUID" not in fstab[0]
    guest_fs = [r for r in doc["remaining"] if r["layer"] == "guest_fs"]
    # from the agent, on the moved disk: /mnt is mounted without discard
    assert [(r["disk"], r["verdict"]) for r in guest_fs] == [(moved["vda"], "block")]
    assert "/mnt (ext4) is mounted without discard" in guest_fs[0]["reason"]
    assert etree.tostring(defined(guest)) == before  # --dry-run changed nothing
    human = vmtrim("fix", "-c", URI, guest.name, "--bus", "scsi", "--dry-run")
    assert "no guest information" not in human.stderr
    assert "! warning: the guest's /etc/fstab line 1 mounts /dev/vda" in human.stderr


def test_restart_waits_for_a_guest_that_ignores_acpi_then_force_destroys(guest: Guest) -> None:
    # Without its agent the guest can only be asked through ACPI, which its init ignores.
    agent = LibvirtAgent(guest.dom)
    agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", "sleep 1; killall qemu-ga"]}, 30)
    deadline = time.monotonic() + 60
    with contextlib.suppress(AgentUnavailable):
        while time.monotonic() < deadline:
            agent.execute("guest-ping", None, 5)
            time.sleep(0.5)
    with pytest.raises(AgentUnavailable):
        agent.execute("guest-ping", None, 5)
    # On a terminal (script(1) gives it one) the wait shows a status line.
    command = [sys.executable, "-m", "vmtrim", "fix", "-c", URI, guest.name, "--bus", "scsi"]
    command += ["--restart", "--restart-timeout", "3"]
    waited = subprocess.run(
        ["script", "-q", "-e", "-c", shlex.join(command), "/dev/null"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert waited.returncode == 3, waited.stdout
    assert "waiting for the shutdown (guest agent, then ACPI)" in waited.stdout
    assert "did not shut down within 3 s" in waited.stdout and "--force" in waited.stdout
    assert guest.dom.isActive()
    # The definition is fixed; the running domain still has the old disk.
    [disk] = defined(guest).iterfind("devices/disk")
    assert disk.find("target").get("bus") == "scsi"  # type: ignore[union-attr]
    [live] = defined(guest, inactive=False).iterfind("devices/disk")
    assert live.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    forced = vmtrim(
        "fix", "-c", URI, guest.name, "--restart", "--restart-timeout", "3", "--force", "--json"
    )
    assert forced.returncode == 0, forced.stderr
    assert "waiting for the shutdown" not in forced.stderr  # not a terminal: no status line
    [doc] = json.loads(forced.stdout)["domains"]
    assert (doc["restarted"], doc["forced"], doc["pending_restart"]) == (True, True, [])
    assert guest.dom.isActive()
    [live] = defined(guest, inactive=False).iterfind("devices/disk")
    assert live.find("target").get("bus") == "scsi"  # type: ignore[union-attr]
    assert live.find("driver").get("discard") == "unmap"  # type: ignore[union-attr]


QUEUE = (
    "for d in /sys/block/sd* /sys/block/vd*; do [ -e $d/queue ] || continue;"
    " echo ${d##*/} $(cat $d/queue/discard_granularity) $(cat $d/queue/rotational); done"
)


def wait_for_agent(dom: Any, timeout: float) -> None:
    agent = LibvirtAgent(dom)
    deadline = time.monotonic() + timeout
    while True:
        try:
            agent.execute("guest-ping", None, 5)
            return
        except AgentUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def guest_queues(guest: Guest) -> dict[str, tuple[int, int]]:
    """Each guest disk's queue/discard_granularity and queue/rotational, once its agent
    answers (after a restart the guest boots again)."""
    wait_for_agent(guest.dom, 180)
    queues = {}
    for line in guest.run(QUEUE).splitlines():
        name, granularity, rotational = line.split()
        queues[name] = (int(granularity), int(rotational))
    return queues


def test_discard_granularity_and_ssd_through_qemu_override_reach_the_guest(guest: Guest) -> None:
    """libvirt 9.0 has no <blockio discard_granularity> (10.0): the fix goes through
    <qemu:override> on the disk's ua- alias, and <target rotation_rate='1'/>. After the
    power cycle the guest's sysfs reads what the device now says."""
    before = guest_queues(guest)
    print(f"before: {before}")
    # auto: the lab's qcow2 has qemu-img's 64 KiB clusters, coarser than what the guest is told.
    auto = vmtrim("fix", "-c", URI, guest.name, "--bus", "scsi", "--discard-granularity", "auto",
                  "--dry-run", "--json")  # fmt: skip
    assert auto.returncode == 0, auto.stderr
    [doc] = json.loads(auto.stdout)["domains"]
    assert {c["setting"]: c["new"] for c in doc["changes"]}[
        "qemu:override discard_granularity"
    ] == "65536"
    done = vmtrim(
        "fix", "-c", URI, guest.name, "--bus", "scsi", "--discard-granularity", "64K", "--ssd",
        "--restart", "--force", "--restart-timeout", "60", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [doc] = json.loads(done.stdout)["domains"]
    assert doc["restarted"] and doc["pending_restart"] == []
    settings = {c["setting"]: c["new"] for c in doc["changes"]}
    assert settings["qemu:override discard_granularity"] == "65536"
    assert settings["target rotation_rate"] == "1"
    assert settings["alias"] == "ua-vmtrim-sda"
    assert any("through <qemu:override> (libvirt 9.0" in w for w in doc["warnings"])
    # libvirt kept what was written: its own read-back of the definition.
    root = defined(guest)
    ns = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}
    [prop] = root.findall(
        "qemu:override/qemu:device[@alias='ua-vmtrim-sda']/qemu:frontend/qemu:property", ns
    )
    assert (prop.get("name"), prop.get("type"), prop.get("value")) == (
        "discard_granularity", "unsigned", "65536",
    )  # fmt: skip
    [disk] = root.iterfind("devices/disk")
    assert disk.find("target").get("rotation_rate") == "1"  # type: ignore[union-attr]
    after = guest_queues(guest)
    print(f"after: {after}")
    assert after["sda"] == (65536, 0)
    assert after != before
    # Run again: nothing left to change, and the guest keeps its settings.
    again = vmtrim("fix", "-c", URI, guest.name, "--discard-granularity", "64K", "--ssd", "--json")
    assert again.returncode == 0, again.stderr
    [doc] = json.loads(again.stdout)["domains"]
    assert doc["changed"] is False and doc["changes"] == []
    auto = vmtrim("fix", "-c", URI, guest.name, "--discard-granularity", "auto", "--json")
    assert auto.returncode == 0, auto.stderr
    [doc] = json.loads(auto.stdout)["domains"]
    assert doc["changes"] == []  # the device already frees what the cluster frees
