"""A generated history: N domains, one disk each, trimmed once a day for R days.

Shared by the benchmarks that read a year of a fleet (history, metrics, report). The
numbers are plausible, not measured: allocation grows between trims and falls at each
trim by what was freed; a tenth of the disks are blocked and never give anything back.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from vmtrim.history.store import DiskRecord, DomainRecord, History

GiB = 1 << 30
DAY = 86400.0


def make_history(path: Path, domains: int = 1000, runs: int = 365, seed: int = 1) -> Path:
    """Write the database at ``path`` (replacing it) and return the path."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    start = time.time() - runs * DAY
    allocated = [rng.randrange(4, 60) * GiB for _ in range(domains)]
    used = [a // 2 for a in allocated]
    blocked = {i for i in range(domains) if i % 10 == 0}
    with History.open(path) as history:
        for day in range(runs):
            started = start + day * DAY
            run_id = history.begin_run("run", trigger="policy", started=started, host="bench")
            results = []
            for i in range(domains):
                before = allocated[i] + rng.randrange(0, 2 * GiB)
                freed = 0 if i in blocked else rng.randrange(0, before - used[i] + 1)
                allocated[i] = before - freed
                results.append(
                    DomainRecord(
                        domain=f"vm{i:04d}",
                        status="blocked" if i in blocked else "trimmed",
                        reason="discard is ignored at block_node" if i in blocked else None,
                        blocking_layer="block_node" if i in blocked else None,
                        started=started + i,
                        seconds=1.0,
                        disks=[
                            DiskRecord(
                                target="sda",
                                source=f"/var/lib/libvirt/images/vm{i:04d}.qcow2",
                                virtual_size=100 * GiB,
                                allocated_before=before,
                                allocated_after=allocated[i],
                                guest_used=used[i],
                                reclaimable_after=allocated[i] - used[i],
                                verdict="block" if i in blocked else "pass",
                                blocking_layer="block_node" if i in blocked else None,
                            )
                        ],
                    )
                )
            history.record_many(run_id, results)
    return path
