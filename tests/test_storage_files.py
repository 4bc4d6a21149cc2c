"""The filesystem under an image, from mountinfo: real tmpfs, overlayfs, btrfs, xfs and
ext4 mounts on this host (NFS from mountinfo lines as the kernel writes them: no NFS
server here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import qemu_img
from storage_support import filesystem, mounted, run
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.channels.libvirt import LibvirtAgent
from vmtrim.channels.qmp import SyncGuestAgent
from vmtrim.model import LayerKind, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.storage.files import file_facts, nfs_version, parse_lsattr
from vmtrim.storage.mounts import mount_of, parse_line, parse_mountinfo
from vmtrim.storage.runner import ExecCapable, LocalRunner, Output

LOCAL = LocalRunner()


def findmnt(path: Path) -> tuple[str, str]:
    """util-linux's own answer: (fstype, target) of the mount holding ``path``."""
    fstype, target = run("findmnt", "-n", "-o", "FSTYPE,TARGET", "--target", str(path)).split(
        None, 1
    )
    return fstype, target


def host_reason(image: Path) -> tuple[Verdict, str]:
    xml = (
        "<domain><name>h</name><os><type machine='pc-q35-7.2'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>"
        f"<source file='{image}'/><target dev='sda' bus='scsi'/></disk>"
        "<controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>"
    )
    (report,) = audit_domain(parse_domain_xml(xml), HostProbes())
    layer = report.layer(LayerKind.HOST_STORAGE)
    return layer.verdict, layer.reason


# ---------------------------------------------------------------- the runner


def test_local_runner_returns_output_and_exit_status() -> None:
    out = LOCAL.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out.exitcode, out.stdout, out.stderr, out.ok) == (3, "out\n", "err\n", False)
    assert out.why() == "sh failed: err"
    assert LOCAL.run(["true"]).ok


def test_local_runner_never_raises() -> None:
    missing = LOCAL.run(["vmtrim-no-such-tool", "-x"])
    assert not missing.ok and missing.why() == "vmtrim-no-such-tool is not installed on this host"
    hung = LOCAL.run(["sleep", "30"], timeout=0.5)
    assert not hung.ok and hung.why() == "sleep did not finish within 0.5 s"
    assert LOCAL.read("/nonexistent/vmtrim") is None


def agents_are_exec_capable(a: LibvirtAgent, b: SyncGuestAgent) -> list[ExecCapable]:
    """mypy checks that both agents fit AgentRunner (the guest test runs the direct one)."""
    return [a, b]


def test_local_runner_bounds_what_it_keeps() -> None:
    from vmtrim.storage.runner import MAX_OUTPUT

    out = LOCAL.run(["head", "-c", str(3 * MAX_OUTPUT), "/dev/zero"])
    assert out.ok and len(out.stdout) == MAX_OUTPUT


# ---------------------------------------------------------------- mountinfo


def test_the_mount_of_a_path_is_the_one_findmnt_names(tmp_path: Path) -> None:
    for path in (tmp_path, Path("/proc/self"), Path("/")):
        facts = file_facts(LOCAL, str(path), os.stat(path).st_dev)
        assert facts.mount is not None
        assert (facts.mount.fstype, facts.mount.mountpoint) == findmnt(path)


def test_tmpfs_over_a_directory_hides_the_filesystem_below(tmp_path: Path) -> None:
    with mounted("vmtrim-test-tmpfs", tmp_path / "t", "size=4m", fstype="tmpfs") as mnt:
        image = mnt / "disk.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(image), "8M")
        verdict, reason = host_reason(image)
        assert verdict is Verdict.PASS
        assert f"tmpfs at {mnt}" in reason and "holes free memory, not disk" in reason


def test_a_mount_point_with_a_space_is_unescaped(tmp_path: Path) -> None:
    with mounted("vmtrim-test-tmpfs", tmp_path / "a dir", "size=1m", fstype="tmpfs") as mnt:
        facts = file_facts(LOCAL, str(mnt), os.stat(mnt).st_dev)
        assert facts.mount is not None and facts.mount.mountpoint == str(mnt)


def test_overlayfs_names_its_upper_layer(tmp_path: Path) -> None:
    for name in ("lower", "upper", "work"):
        (tmp_path / name).mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "lower" / "disk.qcow2"), "8M")
    options = (
        f"lowerdir={tmp_path}/lower",
        f"upperdir={tmp_path}/upper",
        f"workdir={tmp_path}/work",
    )
    with mounted("overlay", tmp_path / "merged", *options, fstype="overlay") as mnt:
        verdict, reason = host_reason(mnt / "disk.qcow2")
        assert f"overlay at {mnt}" in reason
        assert f"holes are punched in the upper layer {tmp_path}/upper" in reason
        assert verdict is Verdict.PASS  # overlayfs hands the punch to ext4 underneath


@pytest.mark.parametrize("fstype", ["xfs", "ext4"])
def test_xfs_and_ext4_on_a_loop_device_punch_holes(fstype: str, tmp_path: Path) -> None:
    with filesystem(fstype, tmp_path) as mnt:
        image = mnt / "disk.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(image), "8M")
        verdict, reason = host_reason(image)
        assert verdict is Verdict.PASS
        assert reason.startswith(f"{fstype} at {mnt} punches holes")


def test_btrfs_compression_and_nodatacow_file(tmp_path: Path) -> None:
    with filesystem("btrfs", tmp_path, "compress=zstd") as mnt:
        plain, nocow = mnt / "plain.raw", mnt / "nocow.raw"
        plain.touch()
        nocow.touch()
        run("chattr", "+C", str(nocow))  # before any data is written, as chattr(1) requires
        lsattr = run("lsattr", "-d", str(nocow)).split()[0]
        assert "C" in lsattr
        facts_plain = file_facts(LOCAL, str(plain), os.stat(plain).st_dev)
        facts_nocow = file_facts(LOCAL, str(nocow), os.stat(nocow).st_dev)
        assert facts_plain.fstype == facts_nocow.fstype == "btrfs"
        # the kernel shows the level it chose: compress=zstd:3
        for facts in (facts_plain, facts_nocow):
            assert any(fact.startswith("compress=zstd") for fact in facts.facts), facts
        assert "the file is No_COW (chattr +C)" in facts_nocow.facts
        assert "the file is No_COW (chattr +C)" not in facts_plain.facts
        verdict, reason = host_reason(nocow)
        assert verdict is Verdict.PASS and "No_COW" in reason and "compress=zstd" in reason


def test_btrfs_mounted_nodatacow(tmp_path: Path) -> None:
    with filesystem("btrfs", tmp_path, "nodatacow") as mnt:
        facts = file_facts(LOCAL, str(mnt), os.stat(mnt).st_dev)
        assert "mounted nodatacow" in facts.facts


# ---------------------------------------------------------------- NFS (mountinfo lines)

# The kernel's NFS lines (fs/nfs/super.c nfs_show_mount_options: "vers=" first among
# the super options), as /proc/self/mountinfo shows them on a client.
NFS42 = (
    "512 29 0:58 / /var/lib/libvirt/images rw,relatime shared:300 - nfs4 nas:/export/vm"
    " rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,"
    "retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2"
)
NFS3 = (
    "513 29 0:59 / /srv/images rw,relatime shared:301 - nfs nas:/export/old"
    " rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,"
    "sec=sys,mountaddr=10.0.0.2,mountvers=3,mountport=20048,mountproto=udp,local_lock=none,"
    "addr=10.0.0.2"
)


class FakeMountinfo:
    """A runner whose /proc/self/mountinfo is given: there is no NFS server here."""

    where = "a client"

    def __init__(self, text: str) -> None:
        self.text = text

    def run(self, argv: object, *, timeout: float = 30.0) -> Output:
        return Output(("lsattr",), None, error="not run")

    def read(self, path: str) -> str | None:
        return self.text if path == "/proc/self/mountinfo" else None

    def device_number(self, path: str) -> tuple[int, int] | None:
        return None


def test_nfs_below_42_cannot_punch_holes() -> None:
    old = file_facts(FakeMountinfo(NFS3 + "\n" + NFS42), "/srv/images/vm.qcow2")
    new = file_facts(FakeMountinfo(NFS3 + "\n" + NFS42), "/var/lib/libvirt/images/vm.qcow2")
    assert old.mount is not None and nfs_version(old.mount) == (3, 0)
    assert old.blocks is not None and "needs NFS 4.2" in old.blocks
    assert new.mount is not None and nfs_version(new.mount) == (4, 2)
    assert new.blocks is None and new.facts == ("NFS 4.2",)


def test_lsattr_output() -> None:
    assert parse_lsattr("---------------C------ /images/vm.raw\n") == "---------------C------"
    assert parse_lsattr("lsattr: Operation not supported While reading flags on x\n") is None


# ---------------------------------------------------------------- hostile mountinfo


@given(st.text(max_size=300))
def test_any_mountinfo_line_parses_or_is_skipped(line: str) -> None:
    mount = parse_line(line)
    if mount is not None:
        assert mount.fstype and " " not in mount.fstype
    mounts = parse_mountinfo(line)
    mount_of(mounts, "/x/y", None)


def test_absurd_mountinfo_is_bounded() -> None:
    huge = "1 1 0:1 / / rw - ext4 /dev/x rw," + "a" * 100_000
    assert parse_line(huge) is None
    assert parse_line("1 1 99999999999:1 / / rw - ext4 /dev/x rw") is None
    assert mount_of(parse_mountinfo("garbage\n\n - \n"), "/", 0) is None
