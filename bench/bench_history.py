"""Benchmark `vmtrim history --json` over a year of a thousand domains.

Target: under 0.5 s for 1,000 domains x 365 runs (365,000 domain results, one disk
each), the whole command as a user runs it (Python start-up included).

The database is generated with the real store (:class:`vmtrim.history.store.History`,
one transaction per run, as a run writes it). The anchor is the same per-domain
summary asked of the `sqlite3` shell directly: the floor any tool on this database
pays.

    .venv/bin/python bench/bench_history.py [--domains 1000] [--runs 365]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmtrim.history.store import DiskRecord, DomainRecord, History

MiB = 1024 * 1024
DAY = 86400.0
REPEAT = 5
ANCHOR_SQL = (
    "SELECT r.domain, COUNT(*), SUM(r.reclaimed), MAX(r.started), r.status"
    " FROM domain_results r JOIN runs ON runs.id = r.run_id"
    " WHERE runs.kind IN ('run','trim','watch') GROUP BY r.domain;"
)


def generate(path: Path, domains: int, runs: int) -> float:
    rng = random.Random(42)
    start = time.monotonic()
    t0 = time.time() - runs * DAY
    allocated = {i: rng.randrange(1, 40) * 1024 * MiB for i in range(domains)}
    with History.open(path) as history:
        for day in range(runs):
            started = t0 + day * DAY
            run = history.begin_run("run", policy_hash="bench", trigger="policy", started=started)
            batch = []
            for i in range(domains):
                grown = allocated[i] + rng.randrange(0, 512) * MiB
                freed = rng.randrange(0, 512) * MiB if i % 10 else 0
                status = "blocked" if i % 10 == 0 else "trimmed"
                after = grown - freed
                allocated[i] = after
                batch.append(
                    DomainRecord(
                        domain=f"guest-{i:04d}",
                        status=status,
                        reason="sda: block_node: discard is off" if status == "blocked" else None,
                        started=started + i,
                        seconds=0.3,
                        agent_seconds=0.25,
                        guest_trimmed=freed + MiB if freed else None,
                        disks=[
                            DiskRecord(
                                target="vda",
                                source=f"/var/lib/libvirt/images/guest-{i:04d}.qcow2",
                                virtual_size=64 * 1024 * MiB,
                                allocated_before=grown,
                                allocated_after=after if status == "trimmed" else None,
                                guest_used=after - 64 * MiB,
                                reclaimable_after=64 * MiB,
                                verdict="block" if status == "blocked" else "pass",
                                measured_by="du",
                            )
                        ],
                    )
                )
            history.record_many(run, batch)
            history.end_run(run, ended=started + domains)
    return time.monotonic() - start


def timed(command: list[str]) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(REPEAT):
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        times.append(time.monotonic() - start)
        out = result.stdout
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=365)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "history.db"
        took = generate(db, args.domains, args.runs)
        size = db.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("history.db-*"))
        print(
            f"generated {args.domains} domains x {args.runs} runs "
            f"({args.domains * args.runs} results) in {took:.1f} s; {size / MiB:.0f} MiB"
        )
        ours, out = timed([sys.executable, "-m", "vmtrim", "history", "--json", "--db", str(db)])
        doc = json.loads(out)
        assert len(doc["domains"]) == args.domains, len(doc["domains"])
        assert all(d["runs"] == args.runs for d in doc["domains"])
        anchor, _ = timed(["sqlite3", str(db), ANCHOR_SQL])
        startup, _ = timed([sys.executable, "-c", "import vmtrim.cli"])
        print(
            f"vmtrim history --json: {ours:.3f} s (median of {REPEAT}); target < 0.5 s: "
            f"{'met' if ours < 0.5 else 'NOT met'}"
        )
        print(
            f"anchor, sqlite3 shell, the same GROUP BY: {anchor:.3f} s; ratio {ours / anchor:.2f}"
        )
        print(f"of which Python start-up + import vmtrim.cli: {startup:.3f} s")
        since, _ = timed(
            [sys.executable, "-m", "vmtrim", "history", "--json", "--db", str(db), "--since", "30d"]
        )
        print(f"vmtrim history --json --since 30d: {since:.3f} s")


if __name__ == "__main__":
    main()
