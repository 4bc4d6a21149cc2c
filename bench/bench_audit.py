"""Benchmark: `vmtrim audit` on 1,000 generated libvirt domain XMLs (target: < 2 s in total).

Generates (seeded) 1,000 domains with 1-8 disks each over every disk type, bus,
format and discard setting the audit knows, writes them to a temporary folder,
and times, with a warm page cache:

- vmtrim (library): parse + audit of all files in one process, host probes on
  (the generated paths do not exist, so each is an `unknown` after one stat);
- vmtrim (CLI): `vmtrim audit [--json] --xml F1 ... --xml F1000`, one process,
  Python start-up and the JSON document or the table included;
- anchor: plain lxml parsing of the same files (what any XML reader pays), and
  `virt-xml-validate` (libvirt's RNG validation) on a sample, scaled to 1,000.

    .venv/bin/python bench/bench_audit.py [--domains 1000] [--runs 3] [--validate 25]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VMTRIM = str(Path(sys.executable).with_name("vmtrim"))

_BUSES = [("vd", "virtio"), ("sd", "scsi"), ("sd", "sata"), ("hd", "ide"), ("sd", "usb")]
_MACHINES = ["pc-q35-7.2", "pc-i440fx-3.1", "pc-q35-4.2", "pc-i440fx-7.2", "pc"]


def disk_xml(rng: random.Random, index: int) -> str:
    prefix, bus = rng.choice(_BUSES)
    target = f"{prefix}{chr(ord('a') + index)}"
    discard = rng.choice(["", " discard='unmap'", " discard='ignore'"])
    fmt = rng.choice(["qcow2", "raw"])
    kind = rng.choice(["file", "file", "file", "block", "network", "volume"])
    if kind == "file":
        source = f"<source file='/nonexistent/vmtrim-bench/img{index}.{fmt}'/>"
    elif kind == "block":
        source = f"<source dev='/dev/nonexistent-vg/lv{index}'/>"
    elif kind == "network":
        proto = rng.choice(["rbd", "iscsi", "nbd", "gluster"])
        source = (
            f"<source protocol='{proto}' name='pool/img{index}'>"
            "<host name='storage.example' port='6789'/></source>"
        )
    else:
        source = f"<source pool='default' volume='vol{index}.{fmt}'/>"
    backing = ""
    if fmt == "qcow2" and kind == "file" and rng.random() < 0.3:
        backing = (
            "<backingStore type='file'><format type='qcow2'/>"
            "<source file='/nonexistent/vmtrim-bench/base.qcow2'/><backingStore/>"
            "</backingStore>"
        )
    device = "cdrom" if bus in ("sata", "ide") and rng.random() < 0.2 else "disk"
    readonly = "<readonly/>" if device == "cdrom" else ""
    address = (
        f"<address type='drive' controller='0' bus='0' target='0' unit='{index}'/>"
        if bus == "scsi"
        else ""
    )
    return (
        f"<disk type='{kind}' device='{device}'><driver name='qemu' type='{fmt}'"
        f" cache='none'{discard}/>{source}{backing}<target dev='{target}' bus='{bus}'/>"
        f"{readonly}{address}</disk>"
    )


def domain_xml(rng: random.Random, n: int) -> str:
    disks = "".join(disk_xml(rng, i) for i in range(rng.randint(1, 8)))
    return (
        f"<domain type='kvm'><name>bench-{n:04d}</name>"
        f"<uuid>00000000-0000-4000-8000-{n:012d}</uuid><memory unit='KiB'>1048576</memory>"
        f"<vcpu>2</vcpu><os><type arch='x86_64' machine='{rng.choice(_MACHINES)}'>hvm</type>"
        "<boot dev='hd'/></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"{disks}<controller type='scsi' index='0' model='virtio-scsi'/>"
        "<interface type='network'><source network='default'/><model type='virtio'/>"
        "</interface><console type='pty'/></devices></domain>\n"
    )


def best(runs: int, work: object) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--validate",
        type=int,
        default=25,
        help="files to run virt-xml-validate on (scaled up; 0 to skip)",
    )
    args = parser.parse_args()

    from lxml import etree

    from vmtrim.audit.engine import audit_domain
    from vmtrim.audit.hostprobe import HostProbes
    from vmtrim.sources.libvirt_xml import parse_domain_file

    rng = random.Random(2026)
    with tempfile.TemporaryDirectory(prefix="vmtrim-bench-audit-") as folder:
        files = []
        for n in range(args.domains):
            path = Path(folder) / f"dom{n:04d}.xml"
            path.write_text(domain_xml(rng, n))
            files.append(str(path))
        disks = 0

        def vmtrim_library() -> None:
            nonlocal disks
            probes = HostProbes()
            disks = sum(len(audit_domain(parse_domain_file(f), probes)) for f in files)

        def lxml_parse() -> None:
            parser = etree.XMLParser(resolve_entities=False, no_network=True)
            for f in files:
                etree.parse(f, parser)

        def vmtrim_cli(*options: str) -> None:
            argv = [VMTRIM, "audit", *options]
            for f in files:
                argv += ["--xml", f]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode not in (0, 1):
                raise SystemExit(f"vmtrim audit failed: {proc.stderr.strip()}")

        t_lib = best(args.runs, vmtrim_library)
        t_cli = best(args.runs, lambda: vmtrim_cli("--json"))
        t_table = best(args.runs, vmtrim_cli)
        t_lxml = best(args.runs, lxml_parse)
        t_validate = None
        sample = files[: args.validate]
        if sample and shutil.which("virt-xml-validate"):

            def validate() -> None:
                for f in sample:
                    subprocess.run(
                        ["virt-xml-validate", f, "domain"], capture_output=True, check=True
                    )

            t_validate = best(1, validate) * len(files) / len(sample)

    print(f"{args.domains} domains, {disks} disks (best of {args.runs})")
    print(
        f"  vmtrim audit, library (parse + audit):  {t_lib:7.3f} s"
        f"  ({t_lib / args.domains * 1e3:.2f} ms/domain)"
    )
    print(f"  vmtrim audit --json, CLI, one process:  {t_cli:7.3f} s")
    print(f"  vmtrim audit (table), CLI, one process: {t_table:7.3f} s")
    print(
        f"  anchor: lxml parse only:                {t_lxml:7.3f} s"
        f"  -> vmtrim library / lxml = {t_lib / t_lxml:.1f}x"
    )
    if t_validate is not None:
        print(
            f"  anchor: virt-xml-validate (scaled from {len(sample)}): {t_validate:7.1f} s"
            f"  -> vmtrim CLI / virt-xml-validate = {t_cli / t_validate:.3f}x"
        )
    worst = max(t_cli, t_table)
    verdict = "meets" if worst < 2.0 else "MISSES"
    print(f"target < 2 s for {args.domains} domains: slowest CLI form {worst:.3f} s {verdict} it")
    return 0 if worst < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
