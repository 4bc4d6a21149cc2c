"""`vmtrim trim --qga SOCKET --qmp SOCKET` against a lab VM that QEMU runs without libvirt."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from helpers import du_bytes, vmtrim
from vmtrim.channels.qmp import SyncMonitor
from vmtrim.lab import ensure_appliance
from vmtrim.vm.guest import DirectGuest, DiskSpec, GuestSpec, make_workdir

pytestmark = pytest.mark.vm
MiB = 1024 * 1024
WRITE_MIB = 24


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DirectGuest]:
    """Mounted without discard, WRITE_MIB written and deleted, qemu-ga idle."""
    image = tmp_path_factory.mktemp("direct") / "disk.qcow2"
    raw = image.with_suffix(".raw")
    subprocess.run(["truncate", "-s", "128M", str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    spec = GuestSpec(
        ensure_appliance(),
        scenario={"mode": "agent", "agent": "1", "size": str(WRITE_MIB)},
        disk=DiskSpec(image, "qcow2", "virtio-scsi", "unmap"),
        agent=True,
    )
    workdir = make_workdir()
    try:
        with DirectGuest(spec, workdir, subject="direct") as vm:
            vm.ctl.expect("ready", 180)
            vm.ctl.go()
            vm.ctl.expect("written", 180)
            vm.ctl.go()
            vm.ctl.expect("deleted", 180)
            yield vm
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def device_unmap_bytes(guest: DirectGuest) -> int:
    with SyncMonitor(str(guest.paths.qmp), timeout=10) as qmp:
        stats = qmp.execute("query-blockstats")
    assert isinstance(stats, list)
    [entry] = [s for s in stats if s["stats"]["wr_bytes"] > 0]  # the one written disk
    return int(entry["stats"]["unmap_bytes"])


def test_qga_and_qmp_trim_and_count_unmaps(guest: DirectGuest) -> None:
    image = guest.spec.disk.path if guest.spec.disk else None
    assert image is not None
    du_before = du_bytes(image)
    unmaps_before = device_unmap_bytes(guest)
    result = vmtrim(
        "trim", "--qga", str(guest.paths.agent), "--qmp", str(guest.paths.qmp), "--json"
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.trim/1"
    [dom] = doc["domains"]
    assert dom["status"] == "trimmed"
    assert dom["domain"] == "vmtrim-lab"  # QEMU's -name, from QMP query-name
    [disk] = dom["disks"]
    assert disk["source"] == str(image)
    assert (disk["allocated_before"], disk["allocated_after"]) == (du_before, du_bytes(image))
    assert disk["reclaimed_bytes"] >= 0.99 * WRITE_MIB * MiB
    # The unmap counter is QEMU's own (the device's BlockBackend), read here directly too.
    assert disk["unmap_bytes"] == device_unmap_bytes(guest) - unmaps_before
    assert disk["unmap_bytes"] >= disk["reclaimed_bytes"]
    [path] = dom["paths"]
    assert path["path"] == "/mnt" and path["trimmed"] == disk["unmap_bytes"]


def test_qga_mountpoint_runs_fstrim_in_the_guest(guest: DirectGuest) -> None:
    result = vmtrim("trim", "--qga", str(guest.paths.agent), "--mountpoint", "/mnt", "--json")
    assert result.returncode == 0, result.stderr
    [dom] = json.loads(result.stdout)["domains"]
    [path] = dom["paths"]
    # Already trimmed above: the guest's fstrim says so, and the number was parsed.
    assert (path["path"], path["error"], path["trimmed"]) == ("/mnt", None, 0)
    bad = vmtrim("trim", "--qga", str(guest.paths.agent), "--mountpoint", "/nonexistent", "--json")
    [dom] = json.loads(bad.stdout)["domains"]
    assert (bad.returncode, dom["status"]) == (1, "failed")
    assert "/nonexistent" in dom["reason"]


def test_missing_socket_is_bad_input() -> None:
    result = vmtrim("trim", "--qga", "/nonexistent/qga.sock")
    assert result.returncode == 2
    assert result.stderr == "vmtrim: /nonexistent/qga.sock: no such socket (given with --qga)\n"


def test_hostile_and_hung_agents_beside_the_real_guest(guest: DirectGuest) -> None:
    """One run, three targets: an agent with a hostile reply, one that never answers, and
    the real lab guest. The bad ones fail/skip with their reason; the guest's trim stands."""
    from test_channels_replies import HOSTILE, agent, fake
    from vmtrim.channels.qmp import SyncGuestAgent
    from vmtrim.trim import QemuTarget, TrimOptions, trim_all

    image = guest.spec.disk.path if guest.spec.disk else None
    assert image is not None
    refill = (
        "dd if=/dev/urandom of=/mnt/refill bs=1048576 count=16 && sync && rm /mnt/refill && sync"
    )
    with SyncGuestAgent(str(guest.paths.agent), timeout=60) as ga:
        done = ga.run("/bin/sh", ["-c", refill], timeout=180)
    assert done.exitcode == 0, done.err_data
    du_before = du_bytes(image)
    # Generous: the real trim takes well under a second; the hung one takes all of it.
    timeout = 20.0
    with fake(agent(HOSTILE["5000-digit integer"])) as bad, fake(lambda m: None) as hung:
        targets = [
            QemuTarget(str(bad.path), None, timeout=timeout),
            QemuTarget(str(guest.paths.agent), str(guest.paths.qmp), timeout=timeout),
            QemuTarget(str(hung.path), None, timeout=timeout),
        ]
        hostile, real, silent = trim_all(targets, TrimOptions(timeout=timeout, parallel=3))
    assert hostile.status == "failed" and "integer of 5000 digits" in str(hostile.reason)
    assert silent.status == "skipped" and silent.seconds <= timeout + 1
    assert (real.domain, real.status) == ("vmtrim-lab", "trimmed")
    [disk] = real.disks
    assert (disk.allocated_before, disk.allocated_after) == (du_before, du_bytes(image))
    assert disk.reclaimed_bytes is not None and disk.reclaimed_bytes >= 0.99 * 16 * MiB
