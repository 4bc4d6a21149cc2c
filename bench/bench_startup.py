"""Benchmark: start-up cost of the commands, against the floor and the anchors.

Runs every command as a subprocess (the real entry points, Python start-up
included), best of --runs with the page cache warm, side by side in one run:

- the floor: ``python -c pass`` and ``python -c "import numpy"``;
- ``vmtrim --version`` (target <= 50 ms);
- ``vmtrim image info --json`` on a small qcow2 (4 MiB, made by qemu-img/qemu-io)
  against ``qemu-img check --output=json`` and ``qemu-img info --output=json``;
- with --image PATH, the same on that image (bench_image.py builds the 1 TiB ones).

Then it lists what ``image info --json`` imports, slowest first, from ``-X importtime``.

    .venv/bin/python bench/bench_startup.py [--runs 10] [--image /var/tmp/vmtrim-bench/x.qcow2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import import_times

PY = sys.executable
VMTRIM = str(Path(PY).with_name("vmtrim"))


def best(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return min(times)


def small_image(d: Path) -> Path:
    img = d / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", str(img)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return img


def image_rows(img: Path, runs: int) -> None:
    cmds = {
        "vmtrim image info --json": [VMTRIM, "image", "info", "--json", str(img)],
        "qemu-img check --output=json": ["qemu-img", "check", "--output=json", str(img)],
        "qemu-img info --output=json": ["qemu-img", "info", "--output=json", str(img)],
        "qemu-img map --output=json": ["qemu-img", "map", "--output=json", str(img)],
    }
    got = {name: best(cmd, runs) for name, cmd in cmds.items()}
    print(f"\n{img} ({img.stat().st_size} bytes)")
    for name, secs in got.items():
        print(f"  {name:32} {secs * 1000:8.1f} ms")
    info = got["vmtrim image info --json"]
    check = got["qemu-img check --output=json"]
    qmap = got["qemu-img map --output=json"]
    print(f"  info vs qemu-img check: {check / info:5.2f}x (target >= 2x)")
    print(f"  info vs qemu-img map:   {qmap / info:5.2f}x (target >= 10x)")


def imports(img: Path, top: int = 12) -> None:
    rows = [
        (micros, name)
        for micros, name in import_times(["-m", "vmtrim", "image", "info", "--json", str(img)])
        if not name.startswith("  ")  # nested: counted in the module that imported it
    ]
    rows.sort(reverse=True)
    print("\nimage info --json: top-level imports by cumulative time (-X importtime, one run)")
    for micros, name in rows[:top]:
        print(f"  {name:24} {micros / 1000:8.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--image", type=Path, action="append", default=[])
    args = ap.parse_args()
    floor = {
        "python -c pass": [PY, "-c", "pass"],
        "python -c 'import numpy'": [PY, "-c", "import numpy"],
        "python -c 'import click'": [PY, "-c", "import click"],
        "vmtrim --version": [VMTRIM, "--version"],
    }
    print(f"best of {args.runs} runs, page cache warm")
    got = {name: best(cmd, args.runs) for name, cmd in floor.items()}
    for name, secs in got.items():
        print(f"  {name:32} {secs * 1000:8.1f} ms")
    version = got["vmtrim --version"]
    print(f"  vmtrim --version: {version * 1000:.1f} ms (target <= 50 ms)")
    with tempfile.TemporaryDirectory() as d:
        img = small_image(Path(d))
        image_rows(img, args.runs)
        imports(img)
    for extra in args.image:
        image_rows(extra, args.runs)


if __name__ == "__main__":
    main()
