"""Benchmark `vmtrim trim` over 3 libvirt hosts x 3 lab guests: --hosts-parallel 1 against 3.

Target: a speed-up of at least 2.5x with --hosts-parallel 3, and vmtrim's per-domain
overhead over the guests' own fstrim time.

The hosts are three independent libvirtd instances (tests/fleet_hosts.py: each in its
own mount namespace), reached over qemu+tcp://127.0.0.1:PORT/system, so every disk is
measured through libvirt (blockInfo), as on a remote host. Each guest (TCG) wrote and
deleted WRITE_MIB MiB on ext4 mounted without discard. The rounds alternate
--hosts-parallel 1 and 3; before every round after the first, each guest writes and
deletes WRITE_MIB MiB again through guest-exec, so every round has the same work.
--parallel stays 1 (one domain at a time per host): the speed-up is the hosts'.

Per domain, overhead = seconds - agent_seconds (its connection, XML, blockInfo before
and after, threads); the process adds Python start-up and the host connections.

    .venv/bin/python bench/bench_fleet.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import until_deleted  # noqa: E402
from fleet_hosts import FleetHost, free_port, refill, start_host  # noqa: E402
from test_live_libvirt import Lab  # noqa: E402  (the tests' lab domains)
from vmtrim.lab import ensure_appliance  # noqa: E402

HOSTS = 3
GUESTS = 3  # per host
WRITE_MIB = 128
DISK_MIB = 320
MiB = 1024 * 1024


def trim(uris: list[str], hosts_parallel: int) -> tuple[float, dict[str, Any]]:
    args = [sys.executable, "-m", "vmtrim", "trim", "--all", "--json", "--no-history"]
    args += ["--hosts-parallel", str(hosts_parallel)]
    for uri in uris:
        args += ["-c", uri]
    start = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if out.returncode != 0:
        raise RuntimeError(f"vmtrim trim exited {out.returncode}: {out.stderr}{out.stdout[:2000]}")
    return wall, json.loads(out.stdout)


def summary(label: str, wall: float, doc: dict[str, Any]) -> dict[str, float]:
    domains = doc["domains"]
    agent = [d["agent_seconds"] for d in domains]
    over = [d["seconds"] - d["agent_seconds"] for d in domains]
    reclaimed = sum(d["reclaimed_bytes"] or 0 for d in domains)
    hosts = ", ".join(f"{h['seconds']:.2f}" for h in doc["hosts"])
    print(
        f"{label}: wall {wall:.2f} s; {len(domains)} domains"
        f" {sorted({d['status'] for d in domains})};"
        f" reclaimed {reclaimed / MiB:.1f} MiB (blockInfo); per host s: {hosts}"
    )
    print(
        f"    guest fstrim (agent) per domain: mean {sum(agent) / len(agent) * 1000:.0f} ms;"
        f" vmtrim overhead per domain: mean {sum(over) / len(over) * 1000:.1f} ms,"
        f" max {max(over) * 1000:.1f} ms"
    )
    print(f"    the fleet engine (all hosts, inside vmtrim): {doc['fleet']['seconds']:.2f} s")
    return {
        "wall": wall,
        "fleet": doc["fleet"]["seconds"],
        "agent": sum(agent),
        "over": sum(over) / len(over),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each setting")
    rounds = parser.parse_args().rounds
    appliance = ensure_appliance()
    hosts: list[FleetHost] = []
    labs: list[tuple[Lab, Any]] = []
    try:
        t0 = time.monotonic()
        for i in range(HOSTS):
            host = start_host(f"bench{i}", tcp_port=free_port())
            hosts.append(host)
            conn = libvirt.open(host.local_uri)
            labs.append((Lab(conn, appliance), conn))
        guests = [
            lab.start(f"h{h}g{g}", write_mib=WRITE_MIB, disk_mib=DISK_MIB)
            for h, (lab, _) in enumerate(labs)
            for g in range(GUESTS)
        ]
        until_deleted(guests, f"{HOSTS} hosts x {GUESTS} guests booted", WRITE_MIB, t0)
        uris = [h.tcp_uri for h in hosts]
        results: dict[int, list[dict[str, float]]] = {1: [], HOSTS: []}
        for n in range(rounds):
            for setting in (1, HOSTS):
                if results[1] or results[HOSTS]:  # the first round uses the boot's data
                    with ThreadPoolExecutor(len(guests)) as pool:
                        list(pool.map(lambda g: refill(g, WRITE_MIB), guests))
                wall, doc = trim(uris, setting)
                results[setting].append(
                    summary(f"round {n + 1}, --hosts-parallel {setting}", wall, doc)
                )
        serial = min(r["wall"] for r in results[1])
        parallel = min(r["wall"] for r in results[HOSTS])
        print(
            f"best of {rounds}, wall: --hosts-parallel 1 {serial:.2f} s, --hosts-parallel {HOSTS}"
            f" {parallel:.2f} s: speed-up {serial / parallel:.2f}x (target >= 2.5x)"
        )
        engine1 = min(r["fleet"] for r in results[1])
        engine3 = min(r["fleet"] for r in results[HOSTS])
        print(
            f"best of {rounds}, the fleet engine without Python start-up: {engine1:.2f} s vs"
            f" {engine3:.2f} s: speed-up {engine1 / engine3:.2f}x"
        )
        over = [r["over"] for rs in results.values() for r in rs]
        agent = [r["agent"] / (HOSTS * GUESTS) for rs in results.values() for r in rs]
        print(
            f"vmtrim overhead per domain: mean {sum(over) / len(over) * 1000:.1f} ms over a guest"
            f" fstrim of mean {sum(agent) / len(agent) * 1000:.0f} ms"
        )
    finally:
        for lab, conn in labs:
            lab.cleanup()
            conn.close()
        for host in hosts:
            host.stop()


if __name__ == "__main__":
    main()
