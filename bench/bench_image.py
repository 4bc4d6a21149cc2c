"""Benchmark: `vmtrim image info/map` against `qemu-img check/map` on big scattered qcow2s.

Builds (once, cached) a 1 TiB virtual qcow2 with 200,000 randomly placed 64 KiB
clusters and a 20,000-cluster twin, with a numpy generator that writes the
header, refcount table and blocks, L1 and L2 tables itself. Host clusters are
handed out in random order, as 200k random guest writes would, and the data area
is fallocate()d (reserved, not written) so the image needs no minutes of I/O.
`qemu-img check` must pass each image with no errors or leaks, and vmtrim's
figures and map must equal qemu-img's before anything is timed.

Then, with vmtrim's bytecode compiled (as an install leaves it: with
PYTHONDONTWRITEBYTECODE set, a module edited since its last compile would be
compiled again in every run) and the page cache warm for every tool, it runs each
command as a subprocess (the real CLI, Python start-up included), takes the best
of --runs, reads the child's peak RSS and CPU time (user + sys) from wait4(), and
prints the ratios. On a shared host the CPU-time ratio is the steadier figure;
the targets are wall-clock ratios.

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


def build(
    path: Path, virtual: int, clusters: int, seed: int = 2026, *, reserve: bool = True
) -> None:
    """Write the qcow2 v3 that ``clusters`` random 64 KiB guest writes would leave.

    The layout copies what QEMU produces (checked against a qemu-io-written
    image): header, refcount table, first refcount block and L1 in clusters 0-3;
    then, in write order, each write takes the next free cluster, preceded by a
    new L2 table when it is the first write under that L1 entry; every 32768
    clusters a new refcount block sits right after the first cluster it covers.
    """
    import numpy as np  # only in the builder child: the timing parent stays small

    rng = np.random.default_rng(seed)
    writes = rng.choice(virtual // CS, size=clusters, replace=False).astype(np.int64)
    l1_size = -(-virtual // (CS * L2_ENTRIES))
    l1_clusters = -(-l1_size * 8 // CS)
    table = writes // L2_ENTRIES
    _, first_write = np.unique(table, return_index=True)
    opens_table = np.zeros(clusters, dtype=bool)
    opens_table[first_write] = True
    # allocation stream: [L2 table,] data cluster for each write, in write order
    per_write = 1 + opens_table.astype(np.int64)
    stream = len(opens_table) + int(opens_table.sum())
    start = 3 + l1_clusters
    candidates = np.arange(start, start + stream + stream // REFCOUNTS_PER_BLOCK + 2)
    is_refblock = (candidates % REFCOUNTS_PER_BLOCK == 1) & (candidates > REFCOUNTS_PER_BLOCK)
    slots = candidates[~is_refblock][:stream]
    last_slot = np.cumsum(per_write) - 1
    data_host = slots[last_slot]
    l2_host = slots[last_slot[first_write] - 1]
    total = int(slots[-1]) + 1
    refblocks = [2] + [
        k * REFCOUNTS_PER_BLOCK + 1 for k in range(1, -(-total // REFCOUNTS_PER_BLOCK))
    ]
    total = max(total, refblocks[-1] + 1)

    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb",
        3,
        0,
        0,
        CLUSTER_BITS,
        virtual,
        0,
        l1_size,
        3 * CS,
        CS,
        1,
        0,
        0,
        0,
        0,
        0,
        4,
        112,
    )
    header += bytes(8) + bytes(8)  # compression type zlib + padding; end of extensions
    reftable = np.zeros(CS // 8, dtype=">u8")
    reftable[: len(refblocks)] = np.array(refblocks) * CS
    refcounts = np.zeros(len(refblocks) * REFCOUNTS_PER_BLOCK, dtype=">u2")
    refcounts[:total] = 1
    l1 = np.zeros(l1_clusters * CS // 8, dtype=">u8")
    l1[table[first_write]] = np.uint64(COPIED) | (l2_host * CS).astype(np.uint64)
    order = np.argsort(table[first_write])  # L2 tables by L1 index
    sorted_tables = table[first_write][order]
    l2 = np.zeros((len(first_write), L2_ENTRIES), dtype=">u8")
    row = np.searchsorted(sorted_tables, table)
    l2[row, writes % L2_ENTRIES] = np.uint64(COPIED) | (data_host * CS).astype(np.uint64)
    l2_offsets = (l2_host[order] * CS).tolist()

    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        fd = f.fileno()
        f.truncate(total * CS)
        # data clusters are reserved, not written: minutes of I/O saved, same metadata
        # (the pool leaves them as holes: neither tool reads data, and 100 images fit)
        if reserve:
            os.posix_fallocate(fd, start * CS, (total - start) * CS)
        os.pwrite(fd, header.ljust(CS, b"\0"), 0)
        os.pwrite(fd, reftable.tobytes(), CS)
        os.pwrite(fd, l1.tobytes(), 3 * CS)
        for i, off in enumerate(refblocks):
            block = refcounts[i * REFCOUNTS_PER_BLOCK : (i + 1) * REFCOUNTS_PER_BLOCK]
            os.pwrite(fd, block.tobytes(), off * CS)
        for i, off in enumerate(l2_offsets):
            os.pwrite(fd, l2[i].tobytes(), off)
    os.replace(tmp, path)


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds of one run, output discarded."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0,):
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {err}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def verify(path: Path) -> None:
    check = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    if check.returncode != 0:
        raise SystemExit(f"qemu-img check rejects {path}: {check.stderr}")
    q = json.loads(check.stdout)
    ours = json.loads(
        subprocess.run(
            [VMTRIM, "image", "info", "--json", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    for key in ("allocated", "fragmented", "compressed", "total"):
        assert ours[f"{key}_clusters"] == q.get(f"{key}-clusters", 0), key
    assert ours["image_end_offset"] == q["image-end-offset"]
    assert ours["leaks"] == 0 and "leaks" not in q and "corruptions" not in q
    qmap = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    omap = json.loads(
        subprocess.run(
            [VMTRIM, "image", "map", "--json", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert omap["extents"] == qmap, "vmtrim image map differs from qemu-img map"
    print(
        f"  verified: qemu-img check clean, {q['allocated-clusters']} allocated clusters, "
        f"{len(qmap)} map extents identical"
    )


def bench(path: Path, runs: int) -> dict[str, tuple[float, int, float]]:
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
        results[name] = (
            min(s[0] for s in samples),
            max(s[1] for s in samples),
            min(s[2] for s in samples),
        )
    return results


def report(label: str, r: dict[str, tuple[float, int, float]]) -> None:
    print(f"\n{label}")
    print(f"  {'command':32} {'best s':>8} {'peak RSS MiB':>13} {'best CPU s':>11}")
    for name, (secs, rss, cpu) in r.items():
        print(f"  {name:32} {secs:8.3f} {rss / 2**20:13.1f} {cpu:11.3f}")
    info = r["vmtrim image info --json"][0]
    vmap = r["vmtrim image map --json"][0]
    qcheck = r["qemu-img check --output=json"][0]
    qmap = r["qemu-img map --output=json"][0]
    print(f"  info vs qemu-img map:   {qmap / info:6.1f}x faster (target >= 10x)")
    print(f"  info vs qemu-img check: {qcheck / info:6.1f}x faster (target >= 2x)")
    cpu_ratio = r["qemu-img check --output=json"][2] / r["vmtrim image info --json"][2]
    print(f"  info vs qemu-img check: {cpu_ratio:6.1f}x less CPU time")
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
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(virtual)], check=True)
    subprocess.run(
        ["qemu-io", "-t", "unsafe", str(tmp)],
        input=script,
        text=True,
        stdout=subprocess.DEVNULL,
        check=True,
    )
    os.replace(tmp, path)


def build_pool(directory: Path, count: int, clusters: int) -> None:
    """``count`` distinct 1 TiB images of ``clusters`` scattered clusters, data as holes."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = directory / f"pool-{i:03d}.qcow2"
        if not path.exists():
            build(path, TiB, clusters, seed=1000 + i, reserve=False)


def bench_pool(directory: Path, runs: int) -> None:
    files = sorted(str(p) for p in directory.glob("pool-*.qcow2"))
    loop = 'for f in "$@"; do qemu-img check --output=json "$f"; done'
    commands = {
        "vmtrim image info DIR --json": [VMTRIM, "image", "info", "--json", str(directory)],
        "sh loop: qemu-img check --output=json": ["sh", "-c", loop, "sh", *files],
    }
    for cmd in commands.values():
        timed(cmd)
    results = {
        n: min((timed(c) for _ in range(runs)), key=lambda s: s[0]) for n, c in commands.items()
    }
    print(f"\npool: {len(files)} images, 1 TiB virtual, 20k scattered clusters each")
    for name, (secs, rss, _cpu) in results.items():
        print(f"  {name:40} {secs:8.3f} s {rss / 2**20:8.1f} MiB peak RSS")
    ours, theirs = (
        results["vmtrim image info DIR --json"],
        results["sh loop: qemu-img check --output=json"],
    )
    print(f"  pool scan vs qemu-img check loop: {theirs[0] / ours[0]:5.1f}x faster (target >= 5x)")
    print(f"  vmtrim peak RSS: {ours[1] / 2**20:.1f} MiB (target < 300 MB)")


def compile_vmtrim() -> None:
    """Write the bytecode of every vmtrim module, as ``pip install`` does."""
    code = "import compileall, vmtrim; compileall.compile_dir(vmtrim.__path__[0], quiet=1)"
    subprocess.run([sys.executable, "-c", code], check=True)


def in_child(*args: str) -> None:
    """Run a heavy step in a child so this process stays small (children inherit RSS)."""
    subprocess.run([sys.executable, __file__, "--step", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vmtrim-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument(
        "--qemu-io",
        action="store_true",
        help="also build and time images written by qemu-io (about a minute)",
    )
    ap.add_argument("--sizes", default="200000,20000", help="cluster counts, comma-separated")
    ap.add_argument(
        "--pool", type=int, default=0, metavar="N", help="also time a pool of N 20k images"
    )
    ap.add_argument("--step", nargs=3, metavar=("STEP", "PATH", "CLUSTERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        step, path, clusters = args.step[0], Path(args.step[1]), int(args.step[2])
        if step == "build-pool":
            build_pool(path, clusters, 20_000)
            return
        {"build": build, "build-qemu-io": build_with_qemu_io}.get(step, lambda p, v, c: verify(p))(
            path, TiB, clusters
        )
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    compile_vmtrim()
    kinds = [("generated", "build")] + ([("qemu-io", "build-qemu-io")] if args.qemu_io else [])
    for clusters in [int(n) for n in args.sizes.split(",") if n]:
        for kind, step in kinds:
            path = args.dir / f"scatter-{clusters // 1000}k-{kind}.qcow2"
            if args.rebuild or not path.exists():
                t0 = time.perf_counter()
                in_child(step, str(path), str(clusters))
                print(f"built {path} ({kind}) in {time.perf_counter() - t0:.1f} s")
            in_child("verify", str(path), str(clusters))
            report(
                f"{path.name}: 1 TiB virtual, {clusters} scattered 64 KiB clusters ({kind})",
                bench(path, args.runs),
            )
    if args.pool:
        pool = args.dir / f"pool-{args.pool}"
        in_child("build-pool", str(pool), str(args.pool))
        in_child("verify", str(pool / "pool-000.qcow2"), "20000")
        bench_pool(pool, args.runs)


if __name__ == "__main__":
    main()
