"""Benchmark: reading and fixing huge QEMU command lines (linear time, no quadratic paths).

Two inputs, both generated:

- a 1 MiB word: ``qemu-system-x86_64 -append '<1 MiB>' -m 1g`` (shlex once took 29 s);
- a 10,000-drive line: ``-drive file=/vm/dN.qcow2,if=none,id=dN,...`` plus
  ``-device virtio-blk-pci,drive=dN`` per disk, one option per line with ``\\``
  continuations, none with discard (so fix changes every drive).

For each it times, best of ``--runs``:

- vmtrim's splitter (:func:`vmtrim.sources.qemu_opts.split_words`) beside the anchor
  ``shlex.split`` on the same text (posix, what the old code used);
- ``parse_command_line`` (words, options, drive names, the Domain);
- ``fix_qemu_args`` (parse, audit, edit in place, re-parse and audit the result), and
  the unified diff ``--dry-run`` prints.

    .venv/bin/python bench/bench_qemu_args.py [--drives 10000] [--word-mib 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable

from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import FixOptions
from vmtrim.fix.qemu import fix_qemu_args
from vmtrim.sources.qemu_args import parse_command_line
from vmtrim.sources.qemu_opts import split_words


def best(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def big_word(mib: int) -> str:
    return f"qemu-system-x86_64 -append '{'x' * (mib << 20)}' -m 1g\n"


def many_drives(count: int) -> str:
    lines = ["qemu-system-x86_64 -machine pc-q35-7.2 -m 1g -nodefaults"]
    for n in range(count):
        lines.append(f"-drive file=/vm/d{n}.qcow2,if=none,id=d{n},format=qcow2,cache=none")
        lines.append(f"-device virtio-blk-pci,drive=d{n},id=vd{n}")
    return " \\\n  ".join(lines) + "\n"


def row(label: str, seconds: float, anchor: float | None = None) -> None:
    ratio = f"  ({seconds / anchor:.2f}x shlex.split)" if anchor else ""
    print(f"  {label:<34} {seconds * 1000:10.1f} ms{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drives", type=int, default=10_000)
    parser.add_argument("--word-mib", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    offline = HostProbes(local=False)

    text = big_word(args.word_mib)
    print(f"{args.word_mib} MiB word ({len(text):,} bytes)")
    anchor = best(args.runs, lambda: shlex.split(text))
    row("shlex.split (anchor)", anchor)
    row("vmtrim split_words", best(args.runs, lambda: split_words(text)), anchor)
    row("vmtrim parse_command_line", best(args.runs, lambda: parse_command_line(text)), anchor)

    text = many_drives(args.drives)
    print(f"{args.drives:,} drives ({len(text):,} bytes, {len(text.splitlines()):,} lines)")
    anchor = best(args.runs, lambda: shlex.split(text))
    row("shlex.split (anchor)", anchor)
    row("vmtrim split_words", best(args.runs, lambda: split_words(text)), anchor)
    row("vmtrim parse_command_line", best(args.runs, lambda: parse_command_line(text)), anchor)

    def fix() -> None:
        result = fix_qemu_args(text, FixOptions(), probes=offline, read_images=False)
        assert len(result.fixed) == args.drives

    row("vmtrim fix_qemu_args", best(args.runs, fix), anchor)
    result = fix_qemu_args(text, FixOptions(), probes=offline, read_images=False)
    row("FixResult.diff (--dry-run)", best(args.runs, lambda: result.diff), anchor)


if __name__ == "__main__":
    main()
