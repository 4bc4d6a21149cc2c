"""`vmtrim fix --qemu-args` proven on the real lab guest under TCG.

QMP on QEMU 7.2 cannot show a node's ``discard`` setting (see test_fix_qemu_run.py),
so this boots the lab guest with a command line that does not set discard, lets it
write 32 MiB on an ext4 mounted ``-o discard`` and delete it, and measures the host
image: nothing comes back. The same command line after the fix (the library, and
once the real ``vmtrim fix --qemu-args FILE`` command) gives back >= 99 % of it.

The command lines are the lab's own (serial, control port, kernel) plus the disk:

* ``lab-scsi``: the lab's virtio-scsi qcow2 disk as ``-blockdev`` nodes, with their
  ``discard`` removed (QEMU's default is ``ignore``);
* ``legacy-ide``: DESIGN.md's legacy one-liner's ``-drive file=..,cache=none,if=ide,
  format=qcow2`` without ``discard=on`` (one drive: the guest mounts its only disk),
  fixed with ``--modernize --bus scsi``.

Allocation is ``vmtrim.image.allocation.allocated_bytes``, checked against ``du -B1``.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import du_bytes, vmtrim
from vmtrim.channels.qmp import SyncGuestAgent
from vmtrim.fix.policy import FixOptions
from vmtrim.fix.qemu import fix_qemu_args
from vmtrim.image.allocation import allocated_bytes
from vmtrim.lab import Appliance
from vmtrim.sources.qemu_args import tokenize
from vmtrim.verify.engine import Cell, make_image
from vmtrim.vm.guest import DirectGuest, DiskSpec, GuestSpec, make_workdir

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
SIZE_MIB = 32
LEGACY = FixOptions(modernize=True, bus="scsi")


def host_bytes(image: Path) -> int:
    """What the host stores for the image; ``du -B1`` must say the same."""
    ours = allocated_bytes(image)
    du = du_bytes(image)
    assert du == ours, (du, ours)
    return ours


def without_discard(argv: list[str]) -> list[str]:
    """The lab's -blockdev nodes with their discard key removed (QEMU's default: ignore)."""
    out = []
    for token in argv:
        if token.startswith("{"):
            node = json.loads(token)
            node.pop("discard", None)
            token = json.dumps(node, separators=(",", ":"))
        out.append(token)
    return out


# The command line without discard: lab argv (with or without its disk) -> shell text.
Base = Callable[[list[str]], str]
# What the test does to that text before QEMU gets it: (text, workdir) -> text.
Fixer = Callable[[str, Path], str]


def lab_scsi(image: Path) -> Base:
    return lambda argv: shlex.join(without_discard(argv))


def legacy_ide(image: Path) -> Base:
    drive = f"file={image},cache=none,if=ide,format=qcow2"
    return lambda argv: shlex.join([*argv, "-drive", drive])


def unfixed(text: str, workdir: Path) -> str:
    return text


def library(options: FixOptions) -> Fixer:
    return lambda text, workdir: fix_qemu_args(text, options).new_text


def cli(options: FixOptions) -> Fixer:
    """The real command on a file; its stdout must equal what the library prints."""

    def run(text: str, workdir: Path) -> str:
        args = workdir / "qemu.args"
        args.write_text(text)
        flags = ["--modernize"] * options.modernize + (["--bus", options.bus] if options.bus
                                                        else [])  # fmt: skip
        done = vmtrim("fix", "--qemu-args", str(args), *flags)
        assert done.returncode == 0, done.stderr
        assert done.stdout == fix_qemu_args(text, options).new_text
        return done.stdout

    return run


@dataclass
class Run:
    argv: list[str]  # what QEMU was started with
    written: int  # bytes the guest wrote, then deleted
    before: int  # host allocation after the write
    after: int  # host allocation after the delete and its discards
    guest_discarded: int  # bytes of discards the guest's disk completed

    @property
    def reclaimed(self) -> int:
        return self.before - self.after


def boot_and_delete(
    appliance: Appliance, base: Callable[[Path], Base], lab_disk: bool, fixer: Fixer
) -> Run:
    """Write, measure, delete on a guest mounted -o discard, measure; QEMU killed, files gone."""
    workdir = make_workdir()
    try:
        image = make_image(workdir, Cell(size_mib=SIZE_MIB))
        spec = GuestSpec(
            appliance, scenario={"mode": "online", "fs": "ext4", "size": str(SIZE_MIB)},
            disk=DiskSpec(image, "qcow2", "virtio-scsi", "ignore") if lab_disk else None,
        )  # fmt: skip
        launched: list[str] = []

        def rewrite(argv: list[str]) -> list[str]:
            launched[:] = tokenize(fixer(base(image)(argv), workdir))
            return launched

        with DirectGuest(spec, workdir, subject="fix-guest", rewrite_argv=rewrite) as guest:
            ctl = guest.ctl
            ctl.expect("ready", 90)
            ctl.go()
            written = ctl.expect("written", 120)
            before = host_bytes(image)
            ctl.go()
            trimmed = ctl.expect("trimmed", 120)
            after = host_bytes(image)
            ctl.go()
            ctl.expect("done", 60)
            guest.wait_exit(60)
        assert guest.process is not None and guest.process.poll() is not None
        return Run(launched, int(written["bytes"]), before, after,
                   int(trimmed["discarded"]) - int(written["discarded"]))  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        assert not workdir.exists()


CASES = [
    ("lab-scsi-unfixed", lab_scsi, True, unfixed, False),
    ("lab-scsi-fixed-library", lab_scsi, True, library(FixOptions()), True),
    ("legacy-ide-unfixed", legacy_ide, False, unfixed, False),
    ("legacy-ide-fixed-cli", legacy_ide, False, cli(LEGACY), True),
]


@pytest.mark.parametrize(
    ("base", "lab_disk", "fixer", "reclaims"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_guest_discards_reach_the_host_only_after_the_fix(
    appliance: Appliance, base: Callable[[Path], Base], lab_disk: bool, fixer: Fixer,
    reclaims: bool,
) -> None:  # fmt: skip
    run = boot_and_delete(appliance, base, lab_disk, fixer)
    print(f"written={run.written} before={run.before} after={run.after} "
          f"reclaimed={run.reclaimed} ratio={run.reclaimed / run.written:.4f} "
          f"guest_discarded={run.guest_discarded}")  # fmt: skip
    text = shlex.join(run.argv)
    assert run.written == SIZE_MIB * MiB
    assert run.before >= run.written  # the data really reached the host image
    assert run.guest_discarded >= run.written  # the guest sent discards for all of it
    if reclaims:
        assert "discard=unmap" in text or '"discard":"unmap"' in text
        assert run.reclaimed >= 0.99 * run.written
    else:
        assert "discard" not in text
        assert run.reclaimed <= 0.01 * run.written
        assert run.after >= run.written  # the deleted data stays on the host
    if fixer is not unfixed and not lab_disk:  # --modernize --bus scsi: scsi-hd on virtio-scsi
        devices = [run.argv[i + 1].split(",")[0] for i, a in enumerate(run.argv) if a == "-device"]
        assert {"virtio-scsi-pci", "scsi-hd"} <= set(devices) and "if=ide" not in text


QUEUES = (
    "for d in /sys/block/sd*; do echo ${d##*/} $(readlink $d/device)"
    " $(cat $d/queue/discard_granularity) $(cat $d/queue/rotational); done"
)


def test_device_properties_reach_the_guest(appliance: Appliance) -> None:
    """`fix --qemu-args --discard-granularity 64K --ssd` on the lab's scsi-hd: the guest's
    sysfs reads 65536 and rotational 0 for it. A second scsi-hd (scsi-id 1) added after
    the fix, unfixed, is the same device model as it was before: QEMU's defaults."""
    workdir = make_workdir()
    try:
        image = make_image(workdir, Cell(size_mib=SIZE_MIB))
        (workdir / "control").mkdir()
        # Formatted too: the lab mounts whichever disk the guest names sda.
        control = make_image(workdir / "control", Cell(size_mib=SIZE_MIB))
        spec = GuestSpec(
            appliance, scenario={"mode": "agent", "agent": "1", "size": "1"},
            disk=DiskSpec(image, "qcow2", "virtio-scsi", "unmap"), agent=True,
        )  # fmt: skip
        fixed: list[str] = []

        def rewrite(argv: list[str]) -> list[str]:
            args = workdir / "qemu.args"
            args.write_text(shlex.join(argv))
            done = vmtrim("fix", "--qemu-args", str(args), "--discard-granularity", "64K", "--ssd")
            assert done.returncode == 0, done.stderr
            fixed[:] = tokenize(done.stdout)
            file = {"driver": "file", "filename": str(control), "discard": "unmap"}
            node = {"driver": "qcow2", "node-name": "ctl0", "discard": "unmap", "file": file}
            return [*fixed, "-blockdev", json.dumps(node),
                    "-device", "scsi-hd,bus=scsi0.0,drive=ctl0,scsi-id=1"]  # fmt: skip

        with DirectGuest(spec, workdir, subject="fix-props", rewrite_argv=rewrite) as guest:
            guest.ctl.expect("ready", 180)
            with SyncGuestAgent(str(guest.paths.agent), timeout=60, subject="fix-props") as ga:
                status = ga.run("/bin/sh", ["-c", QUEUES], timeout=60)
        assert status.exitcode == 0, status.err_data
        by_target: dict[str, tuple[int, int]] = {}
        for line in status.out_data.decode().splitlines():
            _name, device, granularity, rotational = line.split()
            by_target[device.rsplit("/", 1)[-1]] = (int(granularity), int(rotational))
        print(f"guest queues (SCSI address: discard_granularity, rotational): {by_target}")
        assert by_target == {"0:0:0:0": (65536, 0), "0:0:1:0": (4096, 1)}
        device = next(fixed[i + 1] for i, a in enumerate(fixed) if a == "-device"
                      and fixed[i + 1].startswith("scsi-hd"))  # fmt: skip
        assert device.endswith(",discard_granularity=65536,rotation_rate=1")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
