"""`vmtrim trim --explain` names each cause, made for real in one lab guest.

One libvirt domain (TCG, the lab appliance's ``agent`` scenario, real qemu-ga), booted
once for the module, with one disk per cause (virtio-blk, discard='unmap', ext4; the
scenario's disk is the one SCSI disk, so the guest's sda is always it; the guest tells
the virtio disks apart by their sizes):

- ``sda``: the scenario's own disk, 32 MiB written and deleted: it gets its space back
  (the control: no cause is named for it);
- ``vdb``: a qcow2 holding 24 MiB of files and an internal snapshot made with
  ``qemu-img snapshot -c`` before boot; the guest deletes the files;
- ``vdc``: an overlay whose backing file holds the 24 MiB of files; the guest deletes them;
- ``vdd``: a compat=0.10 overlay (on an empty ext4 base); the guest writes 24 MiB into
  the overlay, then deletes it: QEMU refuses the discards (qcow2 v2 with a backing file);
- ``vde``: a 2 MiB-cluster qcow2 holding 1,536 files of 16 KiB; the guest deletes every
  other one: every freed range is smaller than a cluster;
- ``vdf``: a qcow2 on a ramfs mounted on this host: ramfs cannot punch holes (the host
  probe's fallocate gets EOPNOTSUPP), so QEMU's discards free nothing; the guest writes
  and deletes 24 MiB;

then a second trim right after the first: ext4 reports 0 on every path (it trims only
block groups changed since the last trim in this mount).

``discard-no-unref`` needs QEMU >= 8.1 and libvirt >= 9.5; this machine has QEMU 7.2 and
libvirt 9.0, so that cause can only be found from the configuration: a domain XML file
read by vmtrim's own parser, with a real image (the last test). The thin-pool cause is
in test_trim_pool.py (a thin pool exists only inside a lab guest).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lab_domains
from helpers import du_bytes, vmtrim
from test_live_libvirt import Lab, LabDomain
from vmtrim.channels.libvirt import LibvirtAgent

lab = lab_domains.lab  # the shared module-scoped fixture: this module's guest

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
MiB = 1 << 20
FILES_MIB = 24
#: guest disk -> (size in MiB: the guest tells the disks apart by size, mountpoint)
DISKS = {
    "vdb": (64, "/m/snap"),
    "vdc": (72, "/m/back"),
    "vdd": (80, "/m/c010"),
    "vde": (88, "/m/c2m"),
    "vdf": (96, "/m/ram"),
}
EXPECTED = {
    "vdb": "internal_snapshots",
    "vdc": "backing_chain",
    "vdd": "qcow2_compat_010",
    "vde": "granularity",
    "vdf": "host_fs_no_punch",
}


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def ext4(raw: Path, size_mib: int, content: Path | None = None) -> None:
    with raw.open("wb") as f:
        f.truncate(size_mib * MiB)
    extra: list[str | Path] = ["-d", content] if content else []
    run("mkfs.ext4", "-q", "-F", *extra, raw)


def files(where: Path, count: int, size: int, prefix: str) -> Path:
    where.mkdir(parents=True)
    for i in range(count):
        (where / f"{prefix}{i:05d}").write_bytes(os.urandom(size))
    return where


def build_disks(work: Path) -> dict[str, Path]:
    """The five data images (host side, before boot); their paths by guest disk."""
    big = files(work / "big", FILES_MIB, MiB, "f")
    small = files(work / "small", FILES_MIB * 64, 16 << 10, "s")
    raw = work / "tmp.raw"
    images: dict[str, Path] = {}

    ext4(raw, DISKS["vdb"][0], big)
    images["vdb"] = work / "snap.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, images["vdb"])
    run("qemu-img", "snapshot", "-c", "before-cleanup", images["vdb"])

    ext4(raw, DISKS["vdc"][0], big)
    run("qemu-img", "convert", "-O", "qcow2", raw, work / "back-base.qcow2")
    images["vdc"] = work / "back.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", work / "back-base.qcow2", "-F", "qcow2",
        images["vdc"])  # fmt: skip

    ext4(raw, DISKS["vdd"][0])
    run("qemu-img", "convert", "-O", "qcow2", raw, work / "c010-base.qcow2")
    images["vdd"] = work / "c010.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b",
        work / "c010-base.qcow2", "-F", "qcow2", images["vdd"])  # fmt: skip

    ext4(raw, DISKS["vde"][0], small)
    images["vde"] = work / "c2m.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=2M", raw, images["vde"])

    ext4(raw, DISKS["vdf"][0])
    (work / "ram").mkdir()
    run("mount", "-t", "ramfs", "ramfs", work / "ram")
    images["vdf"] = work / "ram" / "ram.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, images["vdf"])
    raw.unlink()
    shutil.rmtree(big)
    shutil.rmtree(small)
    return images


#: In the guest: mount each data disk (found by its size), free what its cause needs.
GUEST_SCRIPT = """
set -e
dev() {
    for d in /sys/block/vd*; do
        if [ "$(cat "$d/size")" = "$1" ]; then echo "/dev/${d##*/}"; fi
    done
}

for spec in %s; do
    mib=${spec%%:*}; mnt=${spec#*:}
    mkdir -p "$mnt"
    mount -t ext4 "$(dev $((mib * 2048)))" "$mnt"
done
for m in /m/c010 /m/ram; do dd if=/dev/zero of="$m/z" bs=1M count=%d conv=fsync 2>/dev/null; done
sync
rm -f /m/snap/f* /m/back/f* /m/c010/z /m/ram/z
i=0
for f in /m/c2m/s*; do i=$((i + 1)); if [ $((i %% 2)) = 0 ]; then rm -f "$f"; fi; done
sync
cat /sys/block/vd*/queue/discard_granularity | sort -u | tr '\\n' ' '
"""


@dataclass
class Explained:
    dom: LabDomain
    images: dict[str, Path]
    du_before: dict[str, int]
    first: dict[str, Any]  # the first trim's JSON (--explain), its domain
    first_exit: int
    db: Path
    granularity: str  # what the guest's queue/discard_granularity files say


@pytest.fixture(scope="module")
def explained(lab: Lab) -> Iterator[Explained]:
    work = Path(tempfile.mkdtemp(prefix="vl-explain-"))
    work.chmod(0o755)
    lab_dom: LabDomain | None = None
    try:
        images = build_disks(work)
        lab_dom = lab_domains.define(lab, "explain", work, 32, 128, {t: images[t] for t in DISKS})
        lab_domains.boot(lab_dom)
        name = lab_dom.name
        specs = " ".join(f"{mib}:{mnt}" for mib, mnt in DISKS.values())
        status = LibvirtAgent(lab_dom.dom).run(
            "/bin/sh", ["-c", GUEST_SCRIPT % (specs, FILES_MIB)], timeout=600
        )
        assert status.exitcode == 0, status.err_data.decode(errors="replace")
        granularity = status.out_data.decode().strip()
        images["sda"] = work / "disk.qcow2"
        du_before = {t: du_bytes(p) for t, p in images.items()}
        db = work / "history.db"
        first = vmtrim(
            "trim", "-c", "qemu:///system", "--explain", "--json", "--db", str(db), name,
            timeout=900,
        )  # fmt: skip
        assert first.stdout, first.stderr
        [doc] = json.loads(first.stdout)["domains"]
        yield Explained(lab_dom, images, du_before, doc, first.returncode, db, granularity)
    finally:
        if lab_dom is not None:  # the ramfs is busy while QEMU has the image open
            with contextlib.suppress(Exception):
                lab_dom.dom.destroy()
        subprocess.run(["umount", str(work / "ram")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def causes(doc: dict[str, Any]) -> dict[str, list[str]]:
    return {d["target"]: [c["id"] for c in d.get("causes") or []] for d in doc["disks"]}


def test_each_disk_names_its_cause(explained: Explained) -> None:
    doc = explained.first
    by = {d["target"]: d for d in doc["disks"]}
    report = []
    for target, disk in sorted(by.items()):
        report.append(
            f"{target}: guest {disk['guest_trimmed']} B, host {disk['reclaimed_bytes']} B,"
            f" causes {[c['id'] for c in disk['causes']]}"
        )
    print("\n".join(report), f"\nguest discard_granularity: {explained.granularity}")
    print(f"status {doc['status']}, exit {explained.first_exit}: {doc['reason']}")
    # the audit's blocking layers name only the ramfs disk; explain names every disk's cause
    assert (doc["status"], explained.first_exit) == ("no_effect", 1)
    assert [(b["disk"], b["layer"]) for b in doc["blockers"]] == [("vdf", "host_storage")]
    found = causes(doc)
    for target, cause in EXPECTED.items():
        assert cause in found[target], (target, by[target])
        # the host measured, to the byte, what du says; clearly less than the guest said
        disk = by[target]
        assert disk["allocated_before"] == explained.du_before[target]
        assert disk["allocated_after"] == du_bytes(explained.images[target])
        assert disk["guest_trimmed"] >= 16 * MiB
        assert disk["reclaimed_bytes"] < disk["guest_trimmed"] // 10
    # the control disk got its 32 MiB back and no cause is named for it
    assert by["sda"]["reclaimed_bytes"] >= 31 * MiB and found["sda"] == []
    assert doc["explained"] is True


def test_the_evidence_is_the_disks_own(explained: Explained) -> None:
    by = {d["target"]: {c["id"]: c for c in d["causes"]} for d in explained.first["disks"]}
    snap = by["vdb"]["internal_snapshots"]
    assert snap["facts"]["snapshot_count"] == 1 and "before-cleanup" in snap["evidence"]
    listed = subprocess.run(
        ["qemu-img", "snapshot", "-l", "-U", str(explained.images["vdb"])],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "before-cleanup" in listed
    back = by["vdc"]["backing_chain"]["facts"]
    assert back["backing"] == [str(explained.images["vdc"].parent / "back-base.qcow2")]
    assert back["backing_allocated_bytes"] >= FILES_MIB * MiB  # the files live there
    assert "compat=0.10" in by["vdd"]["qcow2_compat_010"]["evidence"]
    gran = by["vde"]["granularity"]["facts"]
    assert gran["bytes"] == 2 * MiB and gran["layer"] == "format"
    # what the guest was told (virtio-blk: QEMU's default, the 512 B logical block)
    assert [str(gran["above_bytes"])] == explained.granularity.split()
    assert "cannot punch holes" in by["vdf"]["host_fs_no_punch"]["evidence"]
    assert all(c["source"] for d in by.values() for c in d.values())  # each cites its source


def test_the_causes_are_in_the_history(explained: Explained) -> None:
    with sqlite3.connect(explained.db) as conn:
        rows = dict(
            conn.execute(
                "SELECT d.target, d.causes FROM disk_results d JOIN domain_results r"
                " ON r.id = d.result_id WHERE r.domain = ?",
                (explained.dom.name,),
            ).fetchall()
        )
    for target, cause in EXPECTED.items():
        assert cause in [c["id"] for c in json.loads(rows[target])]
    assert json.loads(rows["sda"]) == []


def test_a_second_trim_names_ext4_already_trimmed(explained: Explained) -> None:
    second = vmtrim(
        "trim", "-c", "qemu:///system", "--explain", "--no-history", explained.dom.name,
        timeout=900,
    )  # fmt: skip
    assert second.returncode in (0, 1), second.stderr
    again = vmtrim(
        "trim", "-c", "qemu:///system", "--explain", "--json", "--no-history",
        explained.dom.name, timeout=900,
    )  # fmt: skip
    [doc] = json.loads(again.stdout)["domains"]
    print(second.stdout)
    assert all(p["trimmed"] == 0 for p in doc["paths"]), doc["paths"]
    found = causes(doc)
    for target in ("sda", *DISKS):
        assert found[target] == ["ext4_already_trimmed"], (target, found)
    # the text output names it with the path and the id callers branch on
    assert "ext4_already_trimmed: /m/snap (ext4) reported 0 B trimmed" in second.stdout


def test_discard_no_unref_is_found_from_the_configuration(tmp_path: Path) -> None:
    """QEMU 7.2 / libvirt 9.0 here have no discard-no-unref (QEMU 8.1, libvirt 9.5): it is
    read from a domain XML file, with vmtrim's parser and a real image."""
    from vmtrim.sources.libvirt_xml import parse_domain_file
    from vmtrim.trim.engine import DiskRef
    from vmtrim.trim.explain import disk_causes, domain_evidence

    image = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    xml = tmp_path / "dom.xml"
    xml.write_text(
        "<domain type='kvm'><name>nounref</name><memory>1</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2' discard='unmap' discard_no_unref='on'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    domain = parse_domain_file(str(xml))
    refs = {"vda": DiskRef("vda", str(image), str(image))}
    evidence = domain_evidence(domain, refs, None, None, 10.0, local=True)
    found = disk_causes(evidence.disks["vda"])
    [cause] = [c for c in found if c.id == "discard_no_unref"]
    assert "count host bytes (du)" in cause.evidence


def test_run_records_the_causes(explained: Explained, tmp_path: Path) -> None:
    """`vmtrim run` right after the trims: every path reports 0, and each disk's record
    (and run's JSON) names ext4_already_trimmed, as trim --explain does."""
    from test_run_live import run as run_policy
    from test_run_live import write_policy

    policy = write_policy(tmp_path / "policy.toml", "explain")
    done = run_policy(tmp_path, policy, "--json")
    assert done.stdout, done.stderr
    [dom] = json.loads(done.stdout)["domains"]
    assert dom["domain"] == explained.dom.name
    found = {d["target"]: [c["id"] for c in d["causes"] or []] for d in dom["disks"]}
    assert found == {t: ["ext4_already_trimmed"] for t in ("sda", *DISKS)}, found
    with sqlite3.connect(tmp_path / "history.db") as conn:
        stored = dict(conn.execute("SELECT target, causes FROM disk_results").fetchall())
    assert {t: [c["id"] for c in json.loads(v)] for t, v in stored.items()} == found
    text = run_policy(tmp_path, policy)
    assert "vdb: why: ext4_already_trimmed: /m/snap (ext4) reported 0 B trimmed" in " ".join(
        text.stdout.split()
    ), text.stdout


def test_the_help_lists_every_cause_id() -> None:
    """Scripts branch on the ids: trim --help names exactly the facts table's."""
    from vmtrim.facts import TRIM_CAUSES

    text = " ".join(vmtrim("trim", "--help").stdout.split())
    listed = text.split("ids for scripts): ", 1)[1].split(".", 1)[0]
    assert [i.strip() for i in listed.split(",")] == list(TRIM_CAUSES)


def test_the_default_cluster_is_named_only_when_nothing_else_explains(tmp_path: Path) -> None:
    """64 KiB clusters under virtio-blk's 512 B: the likely cause on a disk that fell short
    with nothing else against it; beside an internal snapshot, the snapshot alone."""
    from vmtrim.sources.libvirt_xml import parse_domain_file
    from vmtrim.trim.engine import DiskRef
    from vmtrim.trim.explain import disk_causes, domain_evidence

    def ids(image: Path) -> list[str]:
        xml = tmp_path / "dom.xml"
        xml.write_text(
            "<domain type='kvm'><name>d</name><memory>1</memory><os><type>hvm</type></os>"
            "<devices><disk type='file' device='disk'>"
            "<driver name='qemu' type='qcow2' discard='unmap'/>"
            f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
        refs = {"vda": DiskRef("vda", str(image), str(image))}
        evidence = domain_evidence(parse_domain_file(str(xml)), refs, None, None, 10, local=True)
        return [c.id for c in disk_causes(evidence.disks["vda"])]

    plain, snap = tmp_path / "plain.qcow2", tmp_path / "snap.qcow2"
    for image in (plain, snap):
        run("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    run("qemu-img", "snapshot", "-c", "s1", snap)
    assert ids(plain) == ["granularity"]
    assert ids(snap) == ["internal_snapshots"]
