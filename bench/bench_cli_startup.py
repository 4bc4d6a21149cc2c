"""Benchmark: CLI start-up. Target: `vmtrim --version` <= 50 ms wall (issue 9, section 6).

Runs, side by side and interleaved (so load on the machine hits each alike):

- anchor: ``python -c pass`` (the interpreter alone, with this venv's site);
- ``vmtrim --version`` (the console script; reads versions, spawns ``qemu-system-x86_64
  --version`` once, imports neither click nor rich);
- ``vmtrim --help`` (click and the group, no subcommand module);
- ``qemu-system-x86_64 --version`` alone, to show what the QEMU line costs.

Prints the median and best wall time of each and the ratio to the anchor, then
``python -X importtime`` of ``--version``'s slowest imports.

    .venv/bin/python bench/bench_cli_startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import import_times

PYTHON = sys.executable
VMTRIM = str(Path(PYTHON).with_name("vmtrim"))
TARGET_S = 0.050

CASES: dict[str, list[str]] = {
    "python -c pass": [PYTHON, "-c", "pass"],
    "vmtrim --version": [VMTRIM, "--version"],
    "vmtrim --help": [VMTRIM, "--help"],
    "qemu-system-x86_64 --version": ["qemu-system-x86_64", "--version"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def slowest_imports(count: int = 8) -> list[tuple[int, str]]:
    return sorted(import_times([VMTRIM, "--version"]), reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    for argv in CASES.values():  # warm the page cache
        wall(argv)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):
        for name, argv in CASES.items():
            times[name].append(wall(argv))
    anchor = statistics.median(times["python -c pass"])
    print(f"CLI start-up, {args.runs} interleaved runs each (median / best wall time)")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"  {name:30} {median * 1000:6.1f} ms / {min(samples) * 1000:6.1f} ms"
            f"  -> {median / anchor:4.1f}x python -c pass"
        )
    version = statistics.median(times["vmtrim --version"])
    verdict = "meets" if version <= TARGET_S else "misses"
    print(
        f"target vmtrim --version <= {TARGET_S * 1000:.0f} ms:"
        f" median {version * 1000:.1f} ms {verdict} it"
    )
    print("slowest imports of vmtrim --version (cumulative, python -X importtime):")
    for micros, name in slowest_imports():
        print(f"  {micros / 1000:6.1f} ms   {name}")


if __name__ == "__main__":
    main()
