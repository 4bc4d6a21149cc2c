"""vmtrim compact on real qcow2 images made by qemu-img and qemu-io.

What a user checks: qemu-img compare says equal, ls -l is smaller, qemu-img check is
clean, the backing link is spelled as before, owner/mode/xattrs are kept; an image a
running QEMU holds, one with internal snapshots and one without room are refused; a
SIGKILL at any point leaves the original or the complete new file, and the next run
leaves no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_refused_in_use, qemu_img, vmtrim
from sparsify_support import sha256

MiB = 1024 * 1024


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".vmtrim-compact-" in p.name)


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    """base.qcow2 <- top.qcow2 (relative backing), 48 MiB written in top, 40 MiB discarded."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "256M")
    qemu_io(base, "write -P 0x11 0 64M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x22 8M 48M", "discard 16M 40M", "write -z 100M 4M")
    return top


def test_compact_overlay_keeps_content_backing_and_metadata(overlay: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.qcow2"
    shutil.copyfile(overlay, reference)
    os.chown(overlay, 1234, 5678)
    os.chmod(overlay, 0o640)
    os.setxattr(overlay, "user.vmtrim-test", b"kept")
    os.setxattr(overlay, "trusted.vmtrim-test", b"also kept")
    size_before = overlay.stat().st_size

    done = vmtrim("compact", str(overlay))
    assert done.returncode == 0, done.stderr

    assert overlay.stat().st_size < size_before
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, overlay)  # raises if different
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    info = qemu_img("info", "--output=json", overlay).stdout
    assert '"backing-filename": "base.qcow2"' in info
    st = overlay.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o640)
    assert os.getxattr(overlay, "user.vmtrim-test") == b"kept"
    assert os.getxattr(overlay, "trusted.vmtrim-test") == b"also kept"
    assert leftovers(tmp_path) == []

    # A second run keeps it equal and no larger.
    again = vmtrim("compact", "--json", str(overlay))
    assert again.returncode == 0, again.stderr
    assert overlay.stat().st_size <= st.st_size
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, overlay)


def test_keep_backup_is_the_original(overlay: Path, tmp_path: Path) -> None:
    original = sha256(overlay)
    done = vmtrim("compact", "--keep-backup", str(overlay))
    assert done.returncode == 0, done.stderr
    backups = list(tmp_path.glob("top.qcow2.*.bak"))
    assert len(backups) == 1
    assert sha256(backups[0]) == original


def test_dry_run_changes_nothing(overlay: Path) -> None:
    before = sha256(overlay)
    done = vmtrim("compact", "--dry-run", str(overlay))
    assert done.returncode == 0, done.stderr
    assert "qemu-img convert" in done.stdout
    assert sha256(overlay) == before


def test_snapshots_refused_unless_dropped(tmp_path: Path) -> None:
    image = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_io(image, "write -P 1 0 8M")
    qemu_img("snapshot", "-c", "before-upgrade", image)
    before = sha256(image)
    refused = vmtrim("compact", str(image))
    assert refused.returncode == 2
    assert "before-upgrade" in refused.stderr and "--drop-snapshots" in refused.stderr
    assert sha256(image) == before
    dropped = vmtrim("compact", "--drop-snapshots", str(image))
    assert dropped.returncode == 0, dropped.stderr
    assert "before-upgrade" not in qemu_img("snapshot", "-l", image).stdout


def test_in_use_refused(overlay: Path) -> None:
    assert_refused_in_use("compact", overlay, "in use", "lock")


def test_no_room_says_how_much_is_missing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True)
    try:
        image = mnt / "full.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", image, "64M")
        qemu_io(image, "write -P 3 0 24M")
        before = sha256(image)
        refused = vmtrim("compact", str(image))
        assert refused.returncode == 3
        assert "bytes missing" in refused.stderr
        assert sha256(image) == before
        assert leftovers(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _start_paused(image: Path, point: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "compact", str(image)],
        env={**os.environ, "VMTRIM_TEST_PAUSE": point},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"paused at {point}" in line, line + (proc.stderr.read() if proc.stderr else "")
    return proc


@pytest.mark.parametrize("point", ["convert", "compare", "rename"])
def test_sigkill_leaves_the_original_and_the_next_run_cleans_up(
    overlay: Path, tmp_path: Path, point: str
) -> None:
    reference = tmp_path / "reference.qcow2"
    shutil.copyfile(overlay, reference)
    original = sha256(overlay)
    proc = _start_paused(overlay, point)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sha256(overlay) == original
    assert len(leftovers(tmp_path)) == 1  # the killed run's temporary file

    done = vmtrim("compact", str(overlay))
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stdout
    assert leftovers(tmp_path) == []
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, overlay)


def test_sigkill_mid_convert(tmp_path: Path) -> None:
    """Killed while qemu-img copies 600 MiB: the original or the whole new file, never half."""
    image = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1G")
    qemu_io(image, "write -P 0x5a 0 600M", "discard 0 100M")
    original = sha256(image)
    reference = tmp_path / "reference.qcow2"
    shutil.copyfile(image, reference)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "compact", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if sha256(image) != original:  # the rename happened: then the new file is complete
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, image)
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # The orphaned qemu-img may still be writing its (now unreferenced) copy: wait for it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = vmtrim("compact", str(image))
        if done.returncode == 0:
            break
        time.sleep(0.5)
    assert done.returncode == 0, done.stderr
    assert leftovers(tmp_path) == []
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, image)


def test_running_libvirt_domain_refused(overlay: Path, tmp_path: Path) -> None:
    """A running domain of libvirt's test driver has the image as its disk's backing file."""
    node = tmp_path / "node.xml"
    node.write_text(
        "<node><domain type='test'><name>web1</name><memory>65536</memory>"
        "<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
        "<source file='/elsewhere/web1.qcow2'/><target dev='vdb' bus='virtio'/>"
        f"<backingStore type='file'><format type='qcow2'/><source file='{overlay}'/>"
        "</backingStore></disk></devices></domain></node>"
    )
    refused = vmtrim("compact", "-c", f"test://{node}", str(overlay))
    assert refused.returncode == 3, refused.stderr
    assert "running libvirt domain web1" in refused.stderr and "vdb" in refused.stderr
