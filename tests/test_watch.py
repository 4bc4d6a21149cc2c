"""`vmtrim watch` against the real libvirtd: a `virsh blockcopy` of a lab guest's disk
is followed by a trim of that guest, recorded with the event as its reason.

The copy (a disk move) carries every block the old image held, the 64 MiB the guest
deleted included; only a trim gives them back. The policy includes only this module's
guests: other guests on the shared libvirtd see events too, and are not ours.
"""

from __future__ import annotations

import json
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest

import lab_domains
from helpers import du_bytes
from lab_domains import OURS
from test_live_libvirt import Lab
from vmtrim.run.watch import describe_block_job, describe_lifecycle

lab = lab_domains.lab  # the shared module-scoped fixture: this module's guests

MiB = 1024 * 1024
SETTLE = 2


def read_line(stream: Any, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def start_watch(tmp: Path) -> subprocess.Popen[str]:
    """`vmtrim watch --json` on this module's guests, once it says it is watching."""
    policy = tmp / "policy.toml"
    policy.write_text(f'include = ["{OURS}*"]\nsettle = {SETTLE}\n')
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmtrim",
            "watch",
            "--policy",
            str(policy),
            "--db",
            str(tmp / "history.db"),
            "--lock",
            str(tmp / "run.lock"),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stderr is not None
    assert "watching qemu:///system" in read_line(watcher.stderr, 60)
    return watcher


def stop_watch(watcher: subprocess.Popen[str]) -> str:
    """SIGTERM; its stderr. It must stop by itself, cleanly."""
    watcher.send_signal(signal.SIGTERM)
    try:
        _, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0
    assert err.strip().endswith("stopped (SIGTERM)")
    return err


@pytest.mark.vm
@pytest.mark.libvirt
def test_blockcopy_is_followed_by_a_recorded_trim(lab: Lab, tmp_path: Path) -> None:
    guest = lab.start("watch", write_mib=64)
    guest.until_deleted()
    db = tmp_path / "history.db"
    watcher = start_watch(tmp_path)
    try:
        assert watcher.stdout is not None
        copy = guest.workdir / "copy.qcow2"
        moved = subprocess.run(
            [
                "virsh",
                "-c",
                "qemu:///system",
                "blockcopy",
                guest.name,
                "sda",
                str(copy),
                "--wait",
                "--pivot",
                "--transient-job",
                "--format",
                "qcow2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert moved.returncode == 0, moved.stderr
        # The bound: the trim comes within settle + 30 s of the finished copy.
        line = read_line(watcher.stdout, SETTLE + 30)
        assert line, "no trim within settle + 30 s"
        doc = json.loads(line)
        du_after = du_bytes(copy)
    finally:
        stop_watch(watcher)

    assert doc["schema"] == "vmtrim.watch/1"
    assert (doc["domain"], doc["status"]) == (guest.name, "trimmed")
    assert doc["trigger"] == "block job copy on sda completed"
    [disk] = doc["disks"]
    assert disk["source"] == str(copy)  # the new image, after the pivot
    assert disk["allocated_after"] == du_after
    assert disk["reclaimed"] >= 0.99 * 64 * MiB

    with sqlite3.connect(db) as conn:
        [(kind, trigger, domain, status, reclaimed)] = conn.execute(
            "SELECT runs.kind, runs.trigger, r.domain, r.status, r.reclaimed"
            " FROM runs JOIN domain_results r ON r.run_id = runs.id"
        ).fetchall()
    assert (kind, trigger) == ("watch", "block job copy on sda completed")
    assert (domain, status, reclaimed) == (guest.name, "trimmed", disk["reclaimed"])


@pytest.mark.vm
@pytest.mark.libvirt
def test_a_started_domain_is_trimmed_once_its_agent_connects(lab: Lab, tmp_path: Path) -> None:
    watcher = start_watch(tmp_path)
    try:
        assert watcher.stdout is not None
        guest = lab.start("boot", write_mib=8)
        line = read_line(watcher.stdout, 240)  # a TCG boot, then the agent, then settle
        assert line, "no trim after the start"
    finally:
        err = stop_watch(watcher)
    doc = json.loads(line)
    assert doc["domain"] == guest.name
    assert doc["trigger"] == "domain started; guest agent connected"
    assert doc["status"] == "trimmed", doc["reason"]
    assert f"{guest.name}: domain started; trim once its guest agent connects" in err


def test_which_events_mean_a_trim() -> None:
    # libvirt-python's own constants: the events the watch reacts to, and the ones it lets be.
    assert describe_lifecycle(
        libvirt, libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED
    ) == ("migration into this host finished")
    assert describe_lifecycle(
        libvirt, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED
    ) == ("domain restored")
    # An incoming migration starts before it is over: no trim yet.
    started_migrated = libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED
    assert describe_lifecycle(libvirt, libvirt.VIR_DOMAIN_EVENT_STARTED, started_migrated) is None
    assert describe_lifecycle(libvirt, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0) is None
    commit = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    assert describe_block_job(libvirt, "vda", commit, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED) == (
        "block job active commit on vda completed"
    )
    ready = libvirt.VIR_DOMAIN_BLOCK_JOB_READY
    assert describe_block_job(libvirt, "vda", commit, ready) is None
    pull = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
    assert describe_block_job(libvirt, "vda", pull, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED) is None
