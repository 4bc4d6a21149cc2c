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
