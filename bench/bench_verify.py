"""Benchmark `vmtrim verify` against the manual recipe it automates (DESIGN.md).

Targets (issue 5): one 200 MiB cell under TCG in under 30 s; the full matrix
(48 cells) in under 10 min on 2 cores; reclaiming cells get back >= 99%.

Anchors, run in the same session:
  * boot: bare ``qemu-system-x86_64 -kernel vmlinuz -initrd ...`` of the same
    lab kernel (the compressed bzImage, as the manual recipe boots it) to init
    and power-off;
  * manual cell: DESIGN.md's hand run (bzImage, virtio-scsi + scsi-hd, qcow2,
    discard=unmap, ext4 -o discard, write N MiB, du, delete, du), driven by a
    minimal loop over the same guest init;
  * manual matrix: 48 x the manual cell, sequential (what a person would do).

    .venv/bin/python bench/bench_verify.py [--size 200] [--no-matrix]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from vmtrim.lab import Appliance, ensure_appliance

QEMU = "qemu-system-x86_64"


def run_vmtrim(*args: str) -> tuple[float, dict[str, Any], int]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vmtrim", "verify", "--accel", "tcg", "--json", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - start
    if done.returncode not in (0, 1):
        sys.exit(f"vmtrim verify failed ({done.returncode}): {done.stderr.strip()}")
    return seconds, json.loads(done.stdout), done.returncode


def bare_qemu(app: Appliance, tmp: str, scenario: str) -> list[str]:
    """The hand recipe's QEMU: TCG, the lab's bzImage and initrd, serial to a file."""
    return [
        QEMU, "-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot", "-nodefaults",
        "-serial", f"file:{tmp}/serial.log", "-kernel", str(app.bzimage),
        "-initrd", str(app.initrd), "-append", f"console=ttyS0 panic=-1 quiet {scenario}",
    ]  # fmt: skip


def anchor_boot(app: Appliance) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        subprocess.run(
            bare_qemu(app, tmp, "vmtrim.mode=probe"),
            check=True,
            timeout=300,
        )
        return time.monotonic() - start


def anchor_cell(app: Appliance, size_mib: int) -> tuple[float, int, int, int]:
    """The hand recipe: (seconds, du before write, du after write, du after delete)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        raw, image, ctl = f"{tmp}/d.raw", f"{tmp}/d.qcow2", f"{tmp}/ctl.sock"
        subprocess.run(["truncate", "-s", "1G", raw], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", raw], check=True)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, image], check=True)
        du0 = os.stat(image).st_blocks * 512
        qemu = subprocess.Popen(
            [
                *bare_qemu(app, tmp, f"vmtrim.mode=online vmtrim.size={size_mib}"),
                "-drive",
                f"file={image},if=none,id=hd,discard=on,format=qcow2",
                "-device",
                "virtio-scsi-pci",
                "-device",
                "scsi-hd,drive=hd",
                "-device",
                "virtio-serial-pci",
                "-chardev",
                f"socket,id=ctl,path={ctl},server=on,wait=off",
                "-device",
                "virtserialport,chardev=ctl,name=org.vmtrim.ctl",
            ]
        )
        try:
            while not os.path.exists(ctl):
                time.sleep(0.05)
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(ctl)
            lines = sock.makefile("rwb", buffering=0)
            du = {}
            for raw_line in lines:
                step = raw_line.decode().split()[1]
                if step in ("step=written", "step=trimmed"):
                    du[step] = os.stat(image).st_blocks * 512
                if step in ("step=ready", "step=written", "step=trimmed"):
                    lines.write(b"go\n")
                if step == "step=done":
                    break
            qemu.wait(timeout=120)
        finally:
            qemu.kill()
            qemu.wait()
        return time.monotonic() - start, du0, du["step=written"], du["step=trimmed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--no-matrix", action="store_true")
    args = parser.parse_args()

    app = ensure_appliance()
    print(
        f"machine: {os.cpu_count()} CPUs, {os.uname().release}; QEMU TCG; "
        f"guest {app.kernel_version}"
    )
    boot = anchor_boot(app)
    print(f"anchor  bare boot (bzImage) to init and power-off: {boot:6.1f} s")

    manual, du0, du1, du2 = anchor_cell(app, args.size)
    print(
        f"anchor  manual {args.size} MiB cell:  {manual:6.1f} s   du {du0 // 1024} KB -> "
        f"{du1 // 1024} KB -> {du2 // 1024} KB"
    )

    seconds, doc, code = run_vmtrim("--size", str(args.size))
    cell = doc["cells"][0]
    print(
        f"vmtrim  verify {args.size} MiB cell:  {seconds:6.1f} s   du "
        f"{cell['allocated_before'] // 1024} KB -> {cell['allocated_after'] // 1024} KB, "
        f"reclaimed {cell['reclaim_ratio']:.2%} (exit {code}; cell itself {cell['seconds']} s)"
    )
    print(
        f"ratio   vmtrim / manual cell: {seconds / manual:.2f}   target < 30 s: "
        f"{'met' if seconds < 30 else 'MISSED'}"
    )

    if args.no_matrix:
        return
    seconds, doc, code = run_vmtrim("--matrix", "--size", str(args.size))
    cells = doc["cells"]
    ok = sum(1 for c in cells if c["ok"])
    reclaiming = [c["reclaim_ratio"] for c in cells if c["expected"] == "reclaim"]
    manual_matrix = len(cells) * manual
    print(
        f"vmtrim  verify --matrix ({len(cells)} cells, {args.size} MiB): {seconds:6.1f} s, "
        f"{ok}/{len(cells)} ok (exit {code}), reclaiming cells got back "
        f"{min(reclaiming):.2%} .. {max(reclaiming):.2%}"
    )
    print(
        f"anchor  manual matrix, sequential ({len(cells)} x manual cell, extrapolated): "
        f"{manual_matrix:6.1f} s"
    )
    print(
        f"ratio   vmtrim / manual matrix: {seconds / manual_matrix:.2f}   target < 600 s: "
        f"{'met' if seconds < 600 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
