"""A GPT disk made by real tools for the sparsify tests and bench.

sgdisk lays out ext4, xfs, btrfs, vfat, swap and an LVM physical volume, with gaps
between some partitions. The host (which has no device-mapper) makes the LVM
metadata with ``lvm --driverloaded n`` and the ext4 inside the logical volume on a
loop device at the volume's offset. Every filesystem gets kept files and a file of
random data that is deleted again, so its blocks are free in the filesystem but
still allocated in the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmtrim.storage.runner import Runner

MiB = 1024 * 1024
ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def sh(*argv: str | Path) -> str:
    out = subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, env=ENV
    )
    return out.stdout


@dataclass
class Disk:
    path: Path
    kept: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> ./path -> sha256
    swap_uuid: str = ""
    swap_label: str = ""
    deleted_bytes: int = 0


@contextlib.contextmanager
def loop(path: Path, *extra: str) -> Iterator[str]:
    dev = sh("losetup", "--find", "--show", *extra, path).strip()
    try:
        yield dev
    finally:
        sh("losetup", "-d", dev)


@contextlib.contextmanager
def mounted(dev: str) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="vmtrim-mnt-"))
    sh("mount", dev, mnt)
    try:
        yield mnt
    finally:
        sh("umount", mnt)
        mnt.rmdir()


def _fill(directory: Path, tag: str, junk_mib: int, disk: Disk, device: str) -> None:
    """Kept files (random, and one text file with a space in its name); junk deleted."""
    kept: dict[str, str] = {}
    for i, size in enumerate((MiB, 3 * MiB + 123)):
        data = os.urandom(size)
        (directory / f"keep-{i}.bin").write_bytes(data)
        kept[f"./keep-{i}.bin"] = hashlib.sha256(data).hexdigest()
    (directory / "sub dir").mkdir()
    text = f"{tag} stays\n".encode()
    (directory / "sub dir" / "note.txt").write_bytes(text)
    kept["./sub dir/note.txt"] = hashlib.sha256(text).hexdigest()
    junk = directory / "junk.bin"
    with open(junk, "wb") as f:
        for _ in range(junk_mib):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    junk.unlink()
    disk.kept[device] = kept
    disk.deleted_bytes += junk_mib * MiB


# name, sgdisk type code, MiB; None is a gap of that many MiB left unpartitioned.
LAYOUT: list[tuple[str | None, str, int]] = [
    ("ext4", "8300", 128),
    (None, "", 8),
    ("xfs", "8300", 300),
    ("btrfs", "8300", 160),
    ("vfat", "0700", 64),
    (None, "", 4),
    ("swap", "8200", 32),
    ("lvm", "8e00", 144),
    ("unknown", "8300", 8),
]


def make_gpt_disk(directory: Path, fmt: str = "qcow2", junk_mib: int = 24) -> Disk:
    raw = directory / "disk.raw"
    total = 1 + sum(size for _, _, size in LAYOUT) + 2
    with open(raw, "wb") as f:
        f.truncate(total * MiB)
    args = ["sgdisk", "-Z"]
    pos = 1
    number = 0
    offsets: dict[str, tuple[int, int]] = {}
    for name, code, size in LAYOUT:
        if name is not None:
            number += 1
            args += [f"-n{number}:{pos}M:+{size}M", f"-t{number}:{code}", f"-c{number}:{name}"]
            offsets[name] = (pos * MiB, size * MiB)
        pos += size
    sh(*args, raw)
    disk = Disk(directory / f"disk.{fmt}")
    with contextlib.ExitStack() as stack:
        # No udev here to make /dev/loopNpM: one loop device per partition, at its offset.
        parts = {
            name: stack.enter_context(loop(raw, "--offset", str(start), "--sizelimit", str(size)))
            for name, (start, size) in offsets.items()
        }
        sh("mkfs.ext4", "-q", "-L", "root fs", parts["ext4"])
        sh("mkfs.xfs", "-q", "-f", "-L", "data", parts["xfs"])
        sh("mkfs.btrfs", "-q", "-f", "-L", "pool", parts["btrfs"])
        sh("mkfs.vfat", "-n", "EFI", parts["vfat"])
        for name, guest in (("ext4", "sda1"), ("xfs", "sda2"), ("btrfs", "sda3")):
            with mounted(parts[name]) as mnt:
                if name == "btrfs":
                    sh("btrfs", "subvolume", "create", mnt / "home")
                _fill(mnt, name, junk_mib, disk, guest)
        _fill_vfat(parts["vfat"], junk_mib, disk)
        # Swap over random data: the area behind the header is what a discard gives back.
        with open(parts["swap"], "wb") as f:
            for _ in range(32):
                f.write(os.urandom(MiB))
        sh("mkswap", "-L", "swap space", parts["swap"])
        disk.deleted_bytes += 31 * MiB
        disk.swap_uuid = sh("blkid", "-s", "UUID", "-o", "value", parts["swap"]).strip()
        disk.swap_label = "swap space"
        _make_lvm(parts["lvm"], junk_mib, disk)
        with open(parts["unknown"], "wb") as f:
            f.write(os.urandom(8 * MiB))  # no signature: left alone
    if fmt == "raw":
        raw.rename(disk.path)
    else:
        sh("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, disk.path)
        raw.unlink()
    return disk


def _fill_vfat(dev: str, junk_mib: int, disk: Disk) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        scratch = Disk(Path(tmp))
        _fill(src, "vfat", 0, scratch, "x")
        junk = src / "junk.bin"
        with open(junk, "wb") as f:
            for _ in range(junk_mib):
                f.write(os.urandom(MiB))
        sh("mcopy", "-i", dev, "-s", src / "keep-0.bin", src / "keep-1.bin", src / "sub dir", "::/")
        sh("mcopy", "-i", dev, junk, "::/junk.bin")
        sh("mdel", "-i", dev, "::/junk.bin")
        disk.kept["sda4"] = scratch.kept["x"]
        disk.deleted_bytes += junk_mib * MiB


def _make_lvm(dev: str, junk_mib: int, disk: Disk) -> None:
    lvm = ("lvm",)
    sh(*lvm, "pvcreate", "-y", "-q", dev)
    sh(*lvm, "vgcreate", "-q", "vmtrimvg", dev)
    sh(*lvm, "lvcreate", "--driverloaded", "n", "-an", "-Zn", "-L", "96M", "-n", "data", "vmtrimvg")
    pe_start = int(
        sh(*lvm, "pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", dev)
    )
    extent = int(
        sh(
            *lvm,
            "vgs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_extent_size",
            "vmtrimvg",
        )
    )
    ranges = sh(*lvm, "lvs", "--noheadings", "-o", "seg_pe_ranges", "vmtrimvg/data").strip()
    first = int(ranges.rsplit(":", 1)[1].split("-")[0])
    # Let the host forget the VG before the guest activates it (the PV is a loop device).
    sh(*lvm, "vgchange", "--driverloaded", "n", "-an", "vmtrimvg")
    with loop(
        Path(dev), "--offset", str(pe_start + first * extent), "--sizelimit", str(96 * MiB)
    ) as lv:
        sh("mkfs.ext4", "-q", "-L", "lv data", lv)
        with mounted(lv) as mnt:
            _fill(mnt, "lvm", junk_mib, disk, "vmtrimvg/data")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def qemu_holding(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real QEMU (paused, -S) with ``image`` as its disk, once it holds QEMU's image lock."""
    from vmtrim.sparsify.inuse import qemu_lock_holder

    qemu = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg"]
    proc = subprocess.Popen(
        [*qemu, "-drive", f"file={image},format=qcow2,if=virtio"], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while qemu_lock_holder(image) is None:
            assert proc.poll() is None, "QEMU exited"
            assert time.monotonic() < deadline, "QEMU never locked the image"
            time.sleep(0.1)
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --- LUKS and LVM thin: one GPT disk, filled inside a guest ---------------------------------
#
# This host's kernel has no device-mapper. cryptsetup luksFormat works on a loop device
# without it (it only writes the header), but opening the volume, and every LVM thin
# operation, needs dm: the filesystems inside are made and filled in a setup guest (the
# sparsify appliance's kernel and tools, with tests/storage_support's agent init).

PASSPHRASE = b"vmtrim sparsify test"  # the LUKS key slots' exact bytes
# (start MiB, size MiB) of each partition
CRYPT = (1, 96)  # 1: LUKS2 holding an ext4
THIN = (97, 160)  # 2: an LVM PV with a thin pool and a thin volume
CRYPT_LVM = (257, 72)  # 3: LUKS2 holding an LVM PV (as Debian's encrypted install)
THIN_LV = "vgt/thin"
CRYPT_LV = "vgc/data"
JUNK_MIB = 24


@dataclass
class CryptThinDisk:
    path: Path
    header_bytes: int  # a LUKS2 header and key slots: everything before the data segment
    kept: dict[str, dict[str, str]] = field(default_factory=dict)  # as the guest's sha256sum
    deleted_bytes: int = 0

    def luks_headers(self) -> list[bytes]:
        """The first header_bytes of partitions 1 and 3, read through qemu-img."""
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            raw = Path(tmp) / "probe.raw"
            sh("qemu-img", "convert", "-O", "raw", self.path, raw)
            with open(raw, "rb") as f:
                out = []
                for start, _ in (CRYPT, CRYPT_LVM):
                    f.seek(start * MiB)
                    out.append(f.read(self.header_bytes))
                return out


def sha256sum_lines(text: str) -> dict[str, str]:
    """sha256sum's "DIGEST  ./path" lines -> {./path: DIGEST}; other lines are ignored."""
    pairs = (line.split("  ", 1) for line in text.splitlines() if "  " in line)
    return {path: digest for digest, path in pairs if len(digest) == 64}


def guest_sh(runner: Runner, script: str, timeout: float = 300.0) -> str:
    """One shell script in the setup guest, through guest-exec; it must exit 0."""
    out = runner.run(["/bin/sh", "-c", f"set -e; {script}"], timeout=timeout)
    assert out.ok, f"{script}: {out.why()}\n{out.stdout}{out.stderr}"
    return out.stdout


@contextlib.contextmanager
def setup_guest(image: Path) -> Iterator[Runner]:
    """The sparsify appliance's kernel and tools with qemu-ga as init (storage_support),
    ``image`` as its virtio-scsi disk sda: a Runner over guest-exec, and a clean stop."""
    import dataclasses
    import shutil

    from storage_support import storage_initrd
    from test_storage_thin import connect_agent
    from vmtrim.lab import ensure_appliance
    from vmtrim.storage.runner import AgentRunner
    from vmtrim.vm.guest import DirectGuest, DiskSpec, GuestSpec, make_workdir

    appliance = ensure_appliance(variant="sparsify")
    work = make_workdir()
    try:
        spec = GuestSpec(
            appliance=dataclasses.replace(appliance, initrd=storage_initrd(appliance.initrd, work)),
            disk=DiskSpec(image, "qcow2", "virtio-scsi", "unmap"),
            agent=True,
            control=False,
            extra_cmdline=("rdinit=/vmtrim-storage-init",),
        )
        with DirectGuest(spec, work, subject="setup guest") as vm:
            agent = connect_agent(vm.paths.agent, time.monotonic() + 300)
            try:
                runner = AgentRunner(agent, "the setup guest")
                # cryptsetup's modules (the storage init loads base and dm only)
                guest_sh(
                    runner,
                    "mkdir -p /run/cryptsetup; while read -r g m; do [ $g = crypt ] &&"
                    " { insmod /lib/modules/$m 2>/dev/null || true; }; done </etc/vmtrim/modules",
                )
                yield runner
                # flush the guest's caches and QEMU's qcow2 metadata before the kill
                guest_sh(runner, "sync")
            finally:
                agent.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fill_in_guest(runner: Runner, dev: str, disk: CryptThinDisk, name: str) -> None:
    """ext4 on ``dev`` with kept files (their sha256 as the guest computes it) and
    JUNK_MIB of random data written and deleted."""
    out = guest_sh(
        runner,
        f"mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 {dev};"
        f" mount -t ext4 {dev} /mnt; mkdir '/mnt/sub dir';"
        " dd if=/dev/urandom of=/mnt/keep.bin bs=1M count=3 2>/dev/null;"
        f" echo '{name} stays' >'/mnt/sub dir/note.txt';"
        f" dd if=/dev/urandom of=/mnt/junk bs=1M count={JUNK_MIB} conv=fsync 2>/dev/null;"
        " rm /mnt/junk; sync; cd /mnt; find . -type f | sort | while read -r f; do"
        ' sha256sum "$f"; done; cd /; umount /mnt',
    )
    disk.kept[name] = sha256sum_lines(out)
    disk.deleted_bytes += JUNK_MIB * MiB


def _luks_format(raw: Path, start_mib: int, size_mib: int) -> int:
    """LUKS2 on the partition at start_mib (cryptsetup, this host); its header's size."""
    with loop(raw, "--offset", str(start_mib * MiB), "--sizelimit", str(size_mib * MiB)) as dev:
        # pbkdf2 with few iterations: a quick open under TCG (argon2 needs up to 1 GiB)
        subprocess.run(
            ["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", dev, "-"],
            input=PASSPHRASE, check=True, capture_output=True,
        )  # fmt: skip
        dump = sh("cryptsetup", "luksDump", dev)
    # "Data segments: 0: crypt offset: 16777216 [bytes]"
    segment = dump.split("Data segments:", 1)[1]
    return int(segment.split("offset:", 1)[1].split()[0])


def _open_in_guest(part: str, name: str, *extra: str) -> str:
    return (
        f"printf %s '{PASSPHRASE.decode()}' | cryptsetup open --key-file - --disable-keyring"
        f" {' '.join(extra)} /dev/{part} {name}"
    )


def make_crypt_thin_disk(directory: Path) -> CryptThinDisk:
    raw = directory / "crypt-thin.raw"
    with open(raw, "wb") as f:
        f.truncate((1 + CRYPT[1] + THIN[1] + CRYPT_LVM[1] + 2) * MiB)
    sh("sgdisk", "-Z", "-n1:1M:+96M", "-t1:8309", "-n2:97M:+160M", "-t2:8e00",
       "-n3:257M:+72M", "-t3:8309", raw)  # fmt: skip
    headers = {_luks_format(raw, *CRYPT), _luks_format(raw, *CRYPT_LVM)}
    assert len(headers) == 1, headers
    disk = CryptThinDisk(directory / "crypt-thin.qcow2", headers.pop())
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk.path)
    raw.unlink()
    with setup_guest(disk.path) as runner:
        guest_sh(runner, _open_in_guest("sda1", "setup"))
        _fill_in_guest(runner, "/dev/mapper/setup", disk, "sda1:luks")
        guest_sh(runner, "cryptsetup close setup")
        guest_sh(
            runner,
            f"{_open_in_guest('sda3', 'setup3')}; lvm pvcreate -q /dev/mapper/setup3;"
            " lvm vgcreate -q vgc /dev/mapper/setup3; lvm lvcreate -q -L 48m -n data vgc",
        )
        _fill_in_guest(runner, "/dev/mapper/vgc-data", disk, CRYPT_LV)
        guest_sh(runner, "lvm vgchange -q -an vgc; cryptsetup close setup3")
        guest_sh(
            runner,
            "lvm pvcreate -q /dev/sda2; lvm vgcreate -q vgt /dev/sda2;"
            " lvm lvcreate -q --type thin-pool -L 128m --chunksize 64k --discards passdown"
            " -Zn -n pool vgt; lvm lvcreate -q -V 192m --thinpool vgt/pool -n thin vgt",
        )
        _fill_in_guest(runner, "/dev/mapper/vgt-thin", disk, THIN_LV)
        guest_sh(runner, "lvm vgchange -q -an vgt")
    return disk


def guest_checksums(runner: Runner) -> dict[str, dict[str, str]]:
    """Open (cryptsetup, lvm), mount read-only and sha256 every filesystem in the setup
    guest: no vmtrim code runs."""
    out: dict[str, dict[str, str]] = {}
    for name, dev, opened in (
        ("sda1:luks", "/dev/mapper/check", _open_in_guest("sda1", "check", "--readonly")),
        (THIN_LV, "/dev/mapper/vgt-thin", "lvm vgchange -q -ay vgt >/dev/null"),
        (CRYPT_LV, "/dev/mapper/vgc-data",
         f"{_open_in_guest('sda3', 'check3', '--readonly')}; lvm vgchange -q -ay vgc >/dev/null"),
    ):  # fmt: skip
        text = guest_sh(
            runner,
            f"{opened}; mount -t ext4 -o ro {dev} /mnt; cd /mnt; find . -type f | sort |"
            ' while read -r f; do sha256sum "$f"; done; cd /; umount /mnt',
        )
        out[name] = sha256sum_lines(text)
    guest_sh(
        runner,
        "cryptsetup close check; lvm vgchange -q -an vgt vgc >/dev/null; cryptsetup close check3",
    )
    return out


# --- the plain lab guest, with a sparsified image as its data disk --------------------------


@contextlib.contextmanager
def lab_guest_with_data_disk(image: Path, fmt: str = "qcow2") -> Iterator[Runner]:
    """The plain lab guest (vmtrim.lab's appliance, its init.sh in the agent scenario on
    its own scratch disk, sda) with ``image`` as a second virtio-scsi disk, read-write as
    a data disk is: a Runner over its qemu-ga."""
    import shutil

    from vmtrim.channels.qmp import SyncGuestAgent
    from vmtrim.lab import ensure_appliance
    from vmtrim.storage.runner import AgentRunner
    from vmtrim.vm.guest import DirectGuest, DiskSpec, GuestSpec, make_workdir

    work = make_workdir()
    try:
        scratch = work / "scratch.raw"
        with open(scratch, "wb") as f:
            f.truncate(64 * MiB)
        sh("mkfs.ext4", "-q", "-F", scratch)
        spec = GuestSpec(
            ensure_appliance(),
            scenario={"mode": "agent", "agent": "1", "size": "1"},
            disk=DiskSpec(scratch, "raw", "virtio-scsi", "unmap"),
            agent=True,
        )

        def data_disk(argv: list[str]) -> list[str]:
            # scsi-id 1: the lab disk (id 0) is scanned first and stays the init's sda
            node = {"driver": fmt, "node-name": "data0", "discard": "unmap",
                    "file": {"driver": "file", "filename": str(image)}}  # fmt: skip
            return [*argv, "-blockdev", json.dumps(node),
                    "-device", "scsi-hd,drive=data0,bus=scsi0.0,scsi-id=1"]  # fmt: skip

        with DirectGuest(spec, work, subject="lab guest", rewrite_argv=data_disk) as vm:
            vm.ctl.expect("ready", 180)  # init.sh mounted its own disk: it booted
            with SyncGuestAgent(str(vm.paths.agent), timeout=120, subject="lab guest") as ga:
                yield AgentRunner(ga, "the lab guest")
                guest_sh(AgentRunner(ga, "the lab guest"), "sync")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lab_guest_checksums(runner: Runner, parts: dict[str, str]) -> dict[str, dict[str, str]]:
    """Mount each partition (appliance name sdaN -> filesystem type) of the data disk
    read-write in the lab guest, sha256 every file, unmount: {sdaN: {./path: digest}}."""
    # The data disk: the sd disk that is not the one init.sh mounted on /mnt.
    disk = guest_sh(
        runner,
        "m=$(awk '$2 == \"/mnt\" {print $1}' /proc/mounts); for d in /sys/block/sd*; do"
        ' [ "/dev/${d##*/}" = "$m" ] || echo "${d##*/}"; done',
    ).strip()
    assert disk and "\n" not in disk, disk
    # init.sh loads ext4's modules only; the others are in the initrd, by group
    guest_sh(
        runner,
        "while read -r g m; do case $g in xfs | btrfs)"
        " insmod /lib/modules/$m 2>/dev/null || true ;; esac; done </etc/vmtrim/modules",
    )
    out: dict[str, dict[str, str]] = {}
    for part, fstype in parts.items():
        dev = f"/dev/{disk}{part.removeprefix('sda')}"
        text = guest_sh(
            runner,
            f"mkdir -p /data; mount -t {fstype} {dev} /data; cd /data; find . -type f |"
            ' sort | while read -r f; do sha256sum "$f"; done; cd /; umount /data',
        )
        out[part] = sha256sum_lines(text)
    return out
