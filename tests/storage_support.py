"""Real filesystems on loop devices for the host-storage tests (root, like the suite)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """``backing`` attached to a free /dev/loopN, detached afterwards."""
    device = run("losetup", "--find", "--show", str(backing))
    try:
        yield device
    finally:
        run("losetup", "-d", device)


@contextlib.contextmanager
def mounted(
    source: str, mountpoint: Path, *options: str, fstype: str | None = None
) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    args = [
        "mount",
        *(["-t", fstype] if fstype else []),
        *(["-o", ",".join(options)] if options else []),
    ]
    run(*args, source, str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("umount", str(mountpoint))


@contextlib.contextmanager
def filesystem(fstype: str, where: Path, *options: str, size_mib: int = 320) -> Iterator[Path]:
    """A fresh ``fstype`` on a sparse file, on a loop device, mounted at ``where/mnt``."""
    image = where / f"{fstype}.img"
    with image.open("wb") as f:
        f.truncate(size_mib << 20)
    run(*MKFS[fstype], str(image))
    with loop_device(image) as device, mounted(device, where / "mnt", *options) as mnt:
        yield mnt


# --- a lab guest with lvm2, dm-thin and the guest agent ---------------------------------

#: PID 1 of the storage guest: the sparsify appliance's modules (base + dm) and qemu-ga,
#: then nothing: every step is a guest-exec from the test, through vmtrim's Runner. The
#: prelude (PATH, /dev, /proc, /sys, the console) is the appliance's guestlib.sh.
STORAGE_INIT = """#!/bin/sh
. /lib/vmtrim/guestlib.sh
mkdir -p /run/lvm /run/lock/lvm /tmp /mnt
while read -r group m; do
    case "$group" in base | dm) insmod "/lib/modules/$m" 2>/dev/null ;; esac
done </etc/vmtrim/modules
for f in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$f")" = org.qemu.guest_agent.0 ] && d=${f%/name} && GA=/dev/${d##*/}
done
qemu-ga -m virtio-serial -p "$GA" -d
echo "VMTRIM step=ready"
while :; do sleep 60; done
"""

# No udev in the guest: libdevmapper makes the /dev nodes itself; no thin_check there.
LVM_CONF = """activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
devices { obtain_device_list_from_udev = 0 }
global { use_lvmlockd = 0 thin_check_executable = "" }
"""

GUEST_TOOLS = ("dmsetup", "mke2fs")
LVM_NAMES = ("lvs", "pvcreate", "vgcreate", "lvcreate", "lvchange")


def storage_initrd(base: Path, work: Path) -> Path:
    """``base`` (the sparsify appliance's initrd) with an overlay archive appended: the
    kernel unpacks concatenated newc archives in order, later files replacing earlier
    (Documentation/driver-api/early-userspace/buffer-format.rst)."""
    from vmtrim.lab.build import find_tool, shared_libraries

    root = work / "overlay"
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "etc" / "lvm").mkdir(parents=True)
    (root / "vmtrim-storage-init").write_text(STORAGE_INIT)
    (root / "vmtrim-storage-init").chmod(0o755)
    (root / "etc" / "lvm" / "lvm.conf").write_text(LVM_CONF)
    for name in GUEST_TOOLS:
        tool = find_tool(name, (f"/usr/sbin/{name}", f"/sbin/{name}"))
        shutil.copy2(tool, root / "usr" / "sbin" / name)
        for wanted, real in shared_libraries(tool):
            dest = root / wanted.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, dest)
    (root / "usr" / "sbin" / "mkfs.ext4").symlink_to("mke2fs")
    for name in LVM_NAMES:  # lvm dispatches on its argv[0]
        (root / "usr" / "sbin" / name).symlink_to("lvm")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    overlay = work / "overlay.cpio"
    with overlay.open("wb") as out:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc"],
            cwd=root,
            input=("\n".join(names) + "\n").encode(),
            stdout=out,
            check=True,
        )
    combined = work / "initrd.img"
    with combined.open("wb") as out:
        for part in (base, overlay):
            with part.open("rb") as f:
                shutil.copyfileobj(f, out)
    return combined
