"""What a coarse layer costs, measured in a lab guest: scattered files freed on ext4 over
qcow2 images of different cluster sizes, with online discard or with fstrim.

One guest boots with every data disk at once (virtio-blk, one qcow2 each); each disk gets
its own ext4, mounted with ``-o discard`` (online) or without (then ``fstrim``). A cell
writes ``count`` files of one size interleaved with as many that stay, deletes the first
set, lets the discards reach QEMU (``sync``, then ``fstrim`` for the fstrim disks), and
reads what the guest freed (statfs free blocks, in the guest) and what the host got back
(``du -B1`` of the qcow2, as tests/helpers.py's du_bytes). Every guest step is a
guest-exec through vmtrim's Runner. Used by tests/test_granularity_lab.py and
bench/bench_granularity.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import du_bytes, qemu_img
from storage_support import storage_initrd
from vmtrim.channels.qmp import SyncGuestAgent
from vmtrim.errors import EnvironmentProblem
from vmtrim.lab import ensure_appliance
from vmtrim.storage.runner import AgentRunner, Runner
from vmtrim.vm.guest import DirectGuest, GuestSpec, make_workdir

KiB, MiB = 1 << 10, 1 << 20
#: freed file size -> how many are freed (as many again stay between them)
COUNTS = {4 * KiB: 1024, 64 * KiB: 256, 1 * MiB: 16, 16 * MiB: 4}
DISK_SIZE = "640M"


@dataclass(frozen=True)
class LabDisk:
    """One data disk: its qcow2 cluster, how the guest frees, the device's granularity."""

    name: str  # the virtio-blk serial, and the image's file name
    cluster: int
    mode: str  # online | fstrim
    device_granularity: int | None = None  # -device ...,discard_granularity=; None: default


@dataclass
class Cell:
    disk: LabDisk
    size: int
    files: int
    guest_freed: int
    host_freed: int
    pattern: str = "scattered"  # or adjacent (freed one by one)

    @property
    def ratio(self) -> float:
        return self.host_freed / self.guest_freed if self.guest_freed > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "cluster": self.disk.cluster,
            "mode": self.disk.mode,
            "device_granularity": self.disk.device_granularity,
            "pattern": self.pattern,
            "size": self.size,
            "files": self.files,
            "guest_freed": self.guest_freed,
            "host_freed": self.host_freed,
            "ratio": round(self.ratio, 4),
        }


def sh(runner: Runner, script: str, timeout: float = 600.0) -> str:
    out = runner.run(["/bin/sh", "-c", script], timeout=timeout)
    if not out.ok:
        raise AssertionError(f"{script[:120]}: {out.why()}\n{out.stdout}{out.stderr}")
    return out.stdout


def connect_agent(path: Path, deadline: float) -> SyncGuestAgent:
    """The guest agent, once qemu-ga inside the (TCG) guest answers a ping."""
    while True:
        agent = SyncGuestAgent(str(path), timeout=10.0, subject="granularity guest agent")
        try:
            agent.__enter__()  # closes its own loop when it fails
        except EnvironmentProblem:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
            continue
        try:
            agent.ping()
            return agent
        except EnvironmentProblem:
            agent.__exit__(None, None, None)
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _blockdev(**options: object) -> str:
    return json.dumps(options, separators=(",", ":"))


def disk_argv(disks: list[LabDisk], images: dict[str, Path]) -> list[str]:
    argv: list[str] = []
    for i, disk in enumerate(disks):
        node = f"g{i}"
        argv += [
            "-blockdev",
            _blockdev(
                driver="file",
                filename=str(images[disk.name]),
                discard="unmap",  # a node referenced by name does not inherit it
                **{"node-name": f"{node}f"},
            ),
            "-blockdev",
            _blockdev(driver="qcow2", file=f"{node}f", discard="unmap", **{"node-name": node}),
            "-device",
            f"virtio-blk-pci,drive={node},serial={disk.name}"
            + (
                f",discard_granularity={disk.device_granularity}" if disk.device_granularity else ""
            ),
        ]
    return argv


@dataclass
class LabGuest:
    runner: Runner
    images: dict[str, Path]
    devices: dict[str, str]  # disk name -> the guest's vdX
    info: dict[str, object]


@contextlib.contextmanager
def booted(disks: list[LabDisk]) -> Iterator[LabGuest]:
    """One lab guest with ``disks``, each a fresh qcow2 with ext4 mounted at /mnt/NAME."""
    appliance = ensure_appliance(variant="sparsify")
    work = make_workdir()
    try:
        images: dict[str, Path] = {}
        for disk in disks:
            images[disk.name] = work / f"{disk.name}.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={disk.cluster}",
                     images[disk.name], DISK_SIZE)  # fmt: skip
        spec = GuestSpec(
            appliance=dataclasses.replace(appliance, initrd=storage_initrd(appliance.initrd, work)),
            agent=True,
            control=False,
            memory_mib=768,
            extra_cmdline=("rdinit=/vmtrim-storage-init",),
        )
        extra = disk_argv(disks, images)
        with DirectGuest(spec, work, subject="granularity", rewrite_argv=lambda a: a + extra) as vm:
            agent = connect_agent(vm.paths.agent, time.monotonic() + 300)
            try:
                runner = AgentRunner(agent, "the granularity guest")
                devices = _devices(runner, [d.name for d in disks])
                for disk in disks:
                    _make_fs(runner, devices[disk.name], disk)
                yield LabGuest(runner, images, devices, vm.info())
            finally:
                agent.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _devices(runner: Runner, names: list[str]) -> dict[str, str]:
    """The guest's vdX of each disk, by its virtio-blk serial."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while len(found) < len(names):
        out = sh(runner, "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial); done")
        for line in out.splitlines():
            words = line.split()
            if len(words) == 2 and words[1] in names:
                found[words[1]] = words[0]
        if len(found) < len(names) and time.monotonic() > deadline:
            raise AssertionError(f"disks missing in the guest: {out!r}")
        time.sleep(0.5)
    return found


def _make_fs(runner: Runner, dev: str, disk: LabDisk) -> None:
    # No lazy init: ext4lazyinit writing inode tables later would move the host figures.
    # mke2fs zeroes the journal with WRITE ZEROES, which qcow2 keeps as zero clusters, so
    # the journal's clusters are allocated by its first commits: a small journal (4 MiB),
    # cycled once by 600 commits here, does not grow the image during the cells.
    sh(runner, f"mkfs.ext4 -q -J size=4 -E nodiscard,lazy_itable_init=0 /dev/{dev}")
    options = "-o discard " if disk.mode == "online" else ""
    mount = f"/mnt/{disk.name}"
    sh(runner, f"mkdir -p {mount} && mount -t ext4 {options}/dev/{dev} {mount}")
    sh(runner, f"i=0; while [ $i -lt 600 ]; do echo $i >{mount}/.warm; sync; i=$((i+1)); done")


def guest_granularity(guest: LabGuest, disk: LabDisk) -> int:
    """What the guest kernel says the disk's discard granularity is."""
    dev = guest.devices[disk.name]
    return int(sh(guest.runner, f"cat /sys/block/{dev}/queue/discard_granularity"))


def _write_script(where: str, size: int, count: int, pattern: str) -> str:
    """``scattered``: freed (d*) and kept (k*) files alternate, so each freed file sits
    between kept ones. ``adjacent``: the freed files are written one after another (one
    free region once they are all gone), then the kept ones."""
    if size <= 64 * KiB:  # ash's builtin printf: no fork per file
        write = f"printf '%{size}s' '' >"
    else:
        write = f"dd if=/dev/zero bs=1M count={size // MiB} status=none of="
    loop = f"i=0; while [ $i -lt {count} ]; do {{}} i=$((i+1)); done"
    if pattern == "scattered":
        body = loop.format(f"{write}{where}/d$i; {write}{where}/k$i;")
    else:
        body = (
            loop.format(f"{write}{where}/d$i;") + "; sync; " + loop.format(f"{write}{where}/k$i;")
        )
    return f"mkdir -p {where} && {body}; sync"


def _delete_script(where: str, pattern: str) -> str:
    if pattern == "scattered":
        return f"rm -f {where}/d*; sync"
    # one at a time, a journal commit each: online discard sees every file on its own
    return f"for f in {where}/d*; do rm -f $f; sync; done"


def _free_bytes(runner: Runner, mount: str) -> int:
    free, block = sh(runner, f"stat -f -c '%f %S' {mount}").split()
    return int(free) * int(block)


def _settled(path: Path) -> int:
    """du of the image once it stops moving (the discards of the last sync have landed)."""
    last = du_bytes(path)
    for _ in range(20):
        time.sleep(1)
        now = du_bytes(path)
        if now == last:
            return now
        last = now
    return last


def cell(
    guest: LabGuest,
    disk: LabDisk,
    size: int,
    count: int | None = None,
    pattern: str = "scattered",
) -> Cell:
    """Write ``count`` files of ``size`` (and as many kept), free them, measure."""
    count = count or COUNTS[size]
    mount = f"/mnt/{disk.name}"
    where = f"{mount}/{pattern[0]}{size}"
    image = guest.images[disk.name]
    sh(guest.runner, _write_script(where, size, count, pattern))
    if disk.mode == "fstrim":  # trim what earlier cells left, so this cell is its own
        sh(guest.runner, f"fstrim {mount}; sync")
    host_before = _settled(image)
    free_before = _free_bytes(guest.runner, mount)
    sh(guest.runner, _delete_script(where, pattern))
    if disk.mode == "fstrim":
        sh(guest.runner, f"fstrim {mount}; sync")
    host_after = _settled(image)
    guest_freed = _free_bytes(guest.runner, mount) - free_before
    return Cell(disk, size, count, guest_freed, host_before - host_after, pattern)


def size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
