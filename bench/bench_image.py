"""Benchmark: `vmtrim image info/map` against `qemu-img check/map` on big scattered qcow2s.

Builds (once, cached) a 1 TiB virtual qcow2 with 200,000 randomly placed 64 KiB
clusters and a 20,000-cluster twin, with a numpy generator that writes the
header, refcount table and blocks, L1 and L2 tables itself. Host clusters are
handed out in random order, as 200k random guest writes would, and the data area
is fallocate()d (reserved, not written) so the image needs no minutes of I/O.
`qemu-img check` must pass each image with no errors or leaks, and vmtrim's
figures and map must equal qemu-img's before anything is timed.

Then, with the page cache warm for every tool, it runs each command as a
subprocess (the real CLI, Python start-up included), takes the best of --runs,
reads the child's peak RSS from wait4(), and prints the ratios.

    .venv/bin/python bench/bench_image.py [--dir /var/tmp/vmtrim-bench] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

TiB = 1 << 40
CLUSTER_BITS = 16
CS = 1 << CLUSTER_BITS
L2_ENTRIES = CS // 8
REFCOUNTS_PER_BLOCK = CS // 2  # refcount_bits 16
COPIED = 1 << 63
HERE = Path(__file__).resolve().parent
VMTRIM = str(Path(sys.executable).with_name("vmtrim"))


def build(path: Path, virtual: int, clusters: int, seed: int = 2026) -> None:
    """Write a valid qcow2 v3 with ``clusters`` random guest clusters allocated."""
    import numpy as np  # only in the builder child: the timing parent stays small

    rng = np.random.default_rng(seed)
    guest = np.sort(rng.choice(virtual // CS, size=clusters, replace=False)).astype(np.int64)
    l1_size = -(-virtual // (CS * L2_ENTRIES))
    l2_index = np.unique(guest // L2_ENTRIES)
    n_l2 = len(l2_index)
    l1_clusters = -(-l1_size * 8 // CS)
    fixed = 2 + l1_clusters + n_l2 + clusters  # header, reftable, L1, L2s, data
    n_rb = 1
    while -(-(fixed + n_rb) // REFCOUNTS_PER_BLOCK) > n_rb:
        n_rb += 1
    total = fixed + n_rb
    rt_off, l1_off = CS, 2 * CS
    rb_first = 2 + l1_clusters
    l2_first = rb_first + n_rb
    data_first = l2_first + n_l2

    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, virtual,
                         0, l1_size, l1_off, rt_off, 1, 0, 0, 0, 0, 0, 4, 112)
    header += bytes(8) + bytes(8)  # compression type zlib + padding; end of extensions

    reftable = np.zeros(CS // 8, dtype=">u8")
    reftable[:n_rb] = (rb_first + np.arange(n_rb)) * CS
    refcounts = np.zeros(n_rb * REFCOUNTS_PER_BLOCK, dtype=">u2")
    refcounts[:total] = 1
    l1 = np.zeros(l1_clusters * CS // 8, dtype=">u8")
    l1[l2_index] = np.uint64(COPIED) | ((l2_first + np.arange(n_l2)) * CS).astype(np.uint64)
    # host clusters in random order: what 200k random guest writes would produce
    host = data_first + rng.permutation(clusters)
    table_of = np.searchsorted(l2_index, guest // L2_ENTRIES)
    l2 = np.zeros((n_l2, L2_ENTRIES), dtype=">u8")
    l2[table_of, guest % L2_ENTRIES] = (np.uint64(COPIED) | (host * CS).astype(np.uint64))

    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(CS, b"\0"))
        f.write(reftable.tobytes())
        f.write(l1.tobytes())
        f.write(refcounts.tobytes())
        f.write(l2.tobytes())
        os.posix_fallocate(f.fileno(), data_first * CS, clusters * CS)
        f.truncate(total * CS)
    os.replace(tmp, path)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run, output discarded."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0,):
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {err}")
    return elapsed, usage.ru_maxrss * 1024


def verify(path: Path) -> None:
    check = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"qemu-img check rejects {path}: {check.stderr}")
    q = json.loads(check.stdout)
    ours = json.loads(subprocess.run([VMTRIM, "image", "info", "--json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)
    for key in ("allocated", "fragmented", "compressed", "total"):
        assert ours[f"{key}_clusters"] == q.get(f"{key}-clusters", 0), key
    assert ours["image_end_offset"] == q["image-end-offset"]
    assert ours["leaks"] == 0 and "leaks" not in q and "corruptions" not in q
    qmap = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)
    omap = json.loads(subprocess.run([VMTRIM, "image", "map", "--json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)
    assert omap["extents"] == qmap, "vmtrim image map differs from qemu-img map"
    print(f"  verified: qemu-img check clean, {q['allocated-clusters']} allocated clusters, "
          f"{len(qmap)} map extents identical")


def bench(path: Path, runs: int) -> dict[str, tuple[float, int]]:
    commands = {
        "vmtrim image info --json": [VMTRIM, "image", "info", "--json", str(path)],
        "vmtrim image map --json": [VMTRIM, "image", "map", "--json", str(path)],
        "qemu-img check --output=json": ["qemu-img", "check", "--output=json", str(path)],
        "qemu-img map --output=json": ["qemu-img", "map", "--output=json", str(path)],
    }
    for cmd in commands.values():  # warm the page cache for everyone
        timed(cmd)
    results = {}
    for name, cmd in commands.items():
        samples = [timed(cmd) for _ in range(runs)]
        results[name] = (min(s[0] for s in samples), max(s[1] for s in samples))
    return results


def report(label: str, r: dict[str, tuple[float, int]]) -> None:
    print(f"\n{label}")
    print(f"  {'command':32} {'best s':>8} {'peak RSS MiB':>13}")
    for name, (secs, rss) in r.items():
        print(f"  {name:32} {secs:8.3f} {rss / 2**20:13.1f}")
    info = r["vmtrim image info --json"][0]
    vmap = r["vmtrim image map --json"][0]
    qcheck = r["qemu-img check --output=json"][0]
    qmap = r["qemu-img map --output=json"][0]
    print(f"  info vs qemu-img map:   {qmap / info:6.1f}x faster (target >= 10x)")
    print(f"  info vs qemu-img check: {qcheck / info:6.1f}x faster (target >= 2x)")
    print(f"  map  vs qemu-img map:   {qmap / vmap:6.1f}x faster (target >= 3x)")
    peak = max(r["vmtrim image info --json"][1], r["vmtrim image map --json"][1])
    print(f"  vmtrim peak RSS:        {peak / 2**20:6.1f} MiB (target < 300 MB)")


def build_with_qemu_io(path: Path, virtual: int, clusters: int, seed: int = 2026) -> None:
    """The slow, honest way: one qemu-io process doing ``clusters`` random 64 KiB writes."""
    import random

    rnd = random.Random(seed)
    picks = rnd.sample(range(virtual // CS), clusters)
    script = "".join(f"write -P 7 {c * CS} 64k\n" for c in picks)
    tmp = path.with_suffix(".tmp")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(virtual)],
                   check=True)
    subprocess.run(["qemu-io", "-t", "unsafe", str(tmp)], input=script, text=True,
                   stdout=subprocess.DEVNULL, check=True)
    os.replace(tmp, path)


def in_child(*args: str) -> None:
    """Run a heavy step in a child so this process stays small (children inherit RSS)."""
    subprocess.run([sys.executable, __file__, "--step", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vmtrim-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--qemu-io", action="store_true",
                    help="also build and time images written by qemu-io (about a minute)")
    ap.add_argument("--step", nargs=3, metavar=("STEP", "PATH", "CLUSTERS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        step, path, clusters = args.step[0], Path(args.step[1]), int(args.step[2])
        {"build": build, "build-qemu-io": build_with_qemu_io}.get(
            step, lambda p, v, c: verify(p))(path, TiB, clusters)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    kinds = [("generated", "build")] + ([("qemu-io", "build-qemu-io")] if args.qemu_io else [])
    for clusters in (200_000, 20_000):
        for kind, step in kinds:
            path = args.dir / f"scatter-{clusters // 1000}k-{kind}.qcow2"
            if args.rebuild or not path.exists():
                t0 = time.perf_counter()
                in_child(step, str(path), str(clusters))
                print(f"built {path} ({kind}) in {time.perf_counter() - t0:.1f} s")
            in_child("verify", str(path), str(clusters))
            report(f"{path.name}: 1 TiB virtual, {clusters} scattered 64 KiB clusters "
                   f"({kind})", bench(path, args.runs))


if __name__ == "__main__":
    main()
