"""Benchmark: `vmtrim fix --xml --dry-run` on one domain with 1,000 and 10,000 disks.

Each domain has a virtio-scsi controller and N qcow2 disks without discard, so fix
edits every disk (the case that took 172 s when the diff was difflib over the whole
files); the second case has N virtio-blk disks on a machine type where they cannot
discard, and ``--bus scsi`` moves them all (a free unit and name for each). Times,
best of --runs, warm page cache:

- vmtrim: `vmtrim fix --xml F --dry-run --no-probe` (one process: start-up, parse,
  audit, edit, audit again, the diff);
- anchor: `diff -u` on the same before/after files (after = `vmtrim fix -o`), the
  tool an admin would otherwise use to see the change.

    .venv/bin/python bench/bench_fix.py [--disks 1000 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VMTRIM = str(Path(sys.executable).with_name("vmtrim"))


def domain_xml(disks: int, *, virtio: bool = False) -> str:
    """SCSI disks on a current machine type, or virtio-blk ones on pc-i440fx-3.1
    (virtio-blk cannot discard there: ``--bus scsi`` moves every disk)."""
    machine = "pc-i440fx-3.1" if virtio else "pc-q35-7.2"
    prefix, bus = ("vd", "virtio") if virtio else ("sd", "scsi")
    parts = [
        "<domain type='kvm'>\n  <name>bench-fix</name>\n  <os>\n"
        f"    <type arch='x86_64' machine='{machine}'>hvm</type>\n  </os>\n  <devices>\n"
        "    <controller type='scsi' index='0' model='virtio-scsi'/>\n"
    ]
    for i in range(disks):
        parts.append(
            "    <disk type='file' device='disk'>\n"
            "      <driver name='qemu' type='qcow2'/>\n"
            f"      <source file='/var/lib/libvirt/images/bench-{i}.qcow2'/>\n"
            f"      <target dev='{prefix}{_letters(i)}' bus='{bus}'/>\n"
            "    </disk>\n"
        )
    parts.append("  </devices>\n</domain>\n")
    return "".join(parts)


def _letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def best(command: list[str], runs: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode not in (0, 1):  # diff -u exits 1 when the files differ
            raise SystemExit(f"{command[0]} failed: {done.stderr}")
        out = done.stdout
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disks", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case':<24} {'vmtrim fix --dry-run':>21}  {'diff -u':>9}  {'ratio':>7}  +lines")
    with tempfile.TemporaryDirectory() as tmp:
        for disks in args.disks:
            for virtio, flags in ((False, []), (True, ["--bus", "scsi"])):
                label = f"{disks} {'virtio --bus scsi' if virtio else 'scsi'}"
                before = Path(tmp) / f"d{disks}-{virtio}.xml"
                after = Path(tmp) / f"d{disks}-{virtio}.fixed.xml"
                before.write_text(domain_xml(disks, virtio=virtio))
                fix = [VMTRIM, "fix", "--xml", str(before), "--no-probe", *flags]
                subprocess.run([*fix, "-o", str(after)], check=True, capture_output=True)
                ours, diff = best([*fix, "--dry-run"], args.runs)
                anchor, _ = best(["diff", "-u", str(before), str(after)], args.runs)
                added = [
                    line for line in diff.splitlines() if line[:1] == "+" and line[:4] != "+++ "
                ]
                ratio = ours / anchor
                print(f"{label:<24} {ours:>20.2f}s  {anchor:>8.3f}s  {ratio:>6.0f}x  {len(added)}")


if __name__ == "__main__":
    main()
