"""Benchmark `vmtrim trim --parallel 3` on 6 lab guests under libvirt, next to `virsh domfstrim`.

Target: vmtrim's own overhead beyond the guests' fstrim time under 5% of the wall
time, or under 100 ms per domain.

Round 1 is the real job: 6 guests (TCG) have written and deleted WRITE_MIB each on
ext4 mounted without discard; `vmtrim trim -c qemu:///system --parallel 3 --json`
trims them. Per domain, overhead = seconds - agent_seconds (XML, du before/after,
threads); the process adds Python start-up and the connection.
Round 2, the anchor: the same guests, now already trimmed, by `virsh domfstrim`
(3 at a time, like --parallel 3) and by vmtrim again, wall time side by side.

    .venv/bin/python bench/bench_trim.py
"""

from __future__ import annotations

import time

from _common import URI, lab_session, until_deleted, virsh_domfstrim, vmtrim_json

GUESTS = 6
WRITE_MIB = 32
PARALLEL = 3


def vmtrim_trim(names: list[str]) -> tuple[float, dict[str, object]]:
    return vmtrim_json("trim", "-c", URI, "--json", "--parallel", str(PARALLEL), *names)


def report(label: str, wall: float, doc: dict[str, object]) -> None:
    domains = doc["domains"]
    assert isinstance(domains, list)
    over = [d["seconds"] - d["agent_seconds"] for d in domains]
    agent = [d["agent_seconds"] for d in domains]
    engine = sum(d["seconds"] for d in domains)
    reclaimed = sum(d["reclaimed_bytes"] or 0 for d in domains)
    print(
        f"{label}: wall {wall:.3f} s for {len(domains)} domains "
        f"(status: {sorted({d['status'] for d in domains})}); host reclaimed "
        f"{reclaimed / 2**20:.1f} MiB"
    )
    print(
        f"  guest fstrim (agent) per domain: mean {sum(agent) / len(agent) * 1000:.0f} ms,"
        f" max {max(agent) * 1000:.0f} ms"
    )
    print(
        f"  vmtrim overhead per domain (seconds - agent_seconds): mean "
        f"{sum(over) / len(over) * 1000:.1f} ms, max {max(over) * 1000:.1f} ms; "
        f"{sum(over) / engine * 100:.1f}% of the engine's time"
    )
    outside = wall - max(d["seconds"] for d in domains)
    print(
        f"  process start-up + connect + output: {outside:.3f} s at most"
        " (wall - the slowest domain)"
    )


def main() -> None:
    with lab_session() as lab:
        t0 = time.monotonic()
        guests = [lab.start(f"b{i}", write_mib=WRITE_MIB) for i in range(GUESTS)]
        until_deleted(guests, f"booted {GUESTS} guests", WRITE_MIB, t0)
        names = [g.name for g in guests]
        wall, doc = vmtrim_trim(names)
        report("round 1, vmtrim trim (the real job)", wall, doc)
        anchor = virsh_domfstrim(names, PARALLEL)
        wall2, doc2 = vmtrim_trim(names)
        print(
            f"round 2 (already trimmed): virsh domfstrim x{GUESTS} ({PARALLEL} at a time) "
            f"{anchor:.3f} s; vmtrim trim {wall2:.3f} s; ratio vmtrim/virsh "
            f"{wall2 / anchor:.2f}"
        )
        report("round 2, vmtrim trim", wall2, doc2)


if __name__ == "__main__":
    main()
