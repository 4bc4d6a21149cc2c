"""Pool-level reclaim and the thin-pool cause, through the real trim engine and record path.

This host's kernel has no device-mapper, so the thin pools live inside a lab guest
(test_storage_thin's guest: lvm2 and dm-thin-pool in the guest's Debian kernel, three
pools with discards passdown, nopassdown and ignore, an ext4 thin volume on each; the
guest's one disk is a loop device on this host). The trim target below is that guest
seen as a host would see a VM on a thin LV: its disk is the thin volume, its pool is read
with vmtrim's own probe (``pool_usage``: dmsetup status and lvs, run in the guest through
the storage runner over guest-exec), its trim is a real fstrim through qemu-ga, and its
"host figure" is the volume's own usage from lvs, or for nopassdown what the device under
the pool gets back: du of the loop device's backing file on this host. Only the target's
glue (which command measures what) is written here; every figure comes from the real
pool, the real guest kernel and the real file.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import test_storage_thin
from helpers import du_bytes
from test_storage_thin import lvs_plain, sh
from vmtrim.channels.qmp import SyncGuestAgent
from vmtrim.storage.block import block_stack
from vmtrim.storage.pool import PoolUsage, pool_usage
from vmtrim.storage.runner import AgentRunner, Runner
from vmtrim.trim.engine import Blocker, DiskRef, TrimOptions, TrimResult, trim_target
from vmtrim.trim.explain import DiskFacts, Evidence

guest = test_storage_thin.guest  # the module-scoped thin guest: booted once for this module

pytestmark = [pytest.mark.vm]
MiB = 1 << 20
WRITE_MIB = 48


class ThinVolumeTarget:
    """The thin guest's volume ``t<pool>`` as a trim target (see the module doc)."""

    def __init__(self, runner: Runner, pool: str, backing: Path | None = None) -> None:
        assert isinstance(runner, AgentRunner) and isinstance(runner.agent, SyncGuestAgent)
        self.runner, self.session = runner, runner.agent
        self.name = f"thin-{pool}"
        self.lv, self.mount, self.backing = f"vg/t{pool}", f"/mnt/{pool}", backing
        self.device = f"/dev/mapper/vg-t{pool}"

    def skip_reason(self) -> str | None:
        return None

    def disks(self) -> list[DiskRef]:
        return [DiskRef(self.lv, self.device)]

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        if self.backing is not None:  # what the storage under the pool keeps
            return du_bytes(self.backing), "du"
        out = sh(self.runner, "lvs", "--noheadings", "--units", "b", "--nosuffix",
                 "--separator", "|", "-o", "data_percent,lv_size", self.lv)  # fmt: skip
        percent, size = (v.strip() for v in out.strip().split("|"))
        return round(float(percent) / 100 * int(size)), "lvs"

    def agent(self, timeout: float) -> SyncGuestAgent:
        return self.session

    def unmap_counters(self) -> dict[str, tuple[int, int]] | None:
        return None

    def blockers(self) -> list[Blocker]:
        return []

    def os_id(self, timeout: float) -> str | None:
        return None

    def pool_usage(self, disk: DiskRef) -> PoolUsage | None:
        return pool_usage(self.device, self.runner)

    def evidence(self, timeout: float) -> Evidence:
        facts = DiskFacts(self.lv, pool=block_stack(self.runner, self.device).pool)
        facts.filesystems = [(self.mount, "ext4")]
        return Evidence({self.lv: facts}, {self.mount: {self.lv}})

    def close(self) -> None:
        pass


def fill(runner: Runner, pool: str) -> None:
    sh(runner, "dd", "if=/dev/urandom", f"of=/mnt/{pool}/fill", "bs=1M", f"count={WRITE_MIB}",
       "conv=fsync", timeout=300)  # fmt: skip
    sh(runner, "rm", f"/mnt/{pool}/fill")
    sh(runner, "sync")


def trim(target: ThinVolumeTarget) -> TrimResult:
    options = TrimOptions(mountpoint=target.mount, timeout=300.0, explain=True)
    result = trim_target(target, options)
    assert result.status == "trimmed", result.reason
    return result


def test_passdown_trim_records_the_pool_before_and_after(
    guest: tuple[Runner, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmtrim.cli.trim import render
    from vmtrim.run.record import record_trim

    runner, _ = guest
    fill(runner, "pd")
    lvs_before = lvs_plain(runner, "vg/pd")
    result = trim(ThinVolumeTarget(runner, "pd"))
    lvs_after = lvs_plain(runner, "vg/pd")
    [disk] = result.disks
    before, after = disk.pool_before, disk.pool_after
    assert before is not None and after is not None
    # the readings are the pool's, as lvs itself says them
    assert (before.pool, before.discards) == ("vg/pd", "passdown")
    assert before.data_percent == float(lvs_before["data_percent"])
    assert after.data_percent == float(lvs_after["data_percent"])
    assert disk.pool_reclaimed is not None and disk.pool_reclaimed >= WRITE_MIB * MiB // 2
    assert disk.reclaimed_bytes is not None and disk.reclaimed_bytes >= WRITE_MIB * MiB // 2
    assert disk.causes == []  # it got its space back: nothing to explain

    doc = result.to_json()["disks"][0]["pool"]
    assert doc["before"]["used_bytes"] == before.used_bytes
    assert doc["after"]["data_percent"] == after.data_percent
    assert doc["reclaimed_bytes"] == disk.pool_reclaimed

    render([result])
    text = capsys.readouterr().out
    print(  # after the capture of render()
        f"passdown: guest {result.guest_trimmed_bytes} B; volume {disk.allocated_before} ->"
        f" {disk.allocated_after} B; pool {before.used_bytes} -> {after.used_bytes} B"
        f" ({before.data_percent} % -> {after.data_percent} %)"
    )
    assert f"vg/tpd: thin pool vg/pd (discards=passdown): data {before.data_percent:.2f} %" in text
    assert f"-> {after.data_percent:.2f} %" in text

    db = tmp_path / "history.db"
    assert record_trim([result], db) is None
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT pool, pool_discards, pool_used_before, pool_used_after,"
            " pool_percent_before, pool_percent_after, causes FROM disk_results"
        ).fetchone()
    assert row == (
        "vg/pd",
        "passdown",
        before.used_bytes,
        after.used_bytes,
        before.data_percent,
        after.data_percent,
        "[]",
    )


def test_a_nopassdown_pool_is_the_cause(guest: tuple[Runner, Path]) -> None:
    """The pool frees the chunks, but the device under it (the loop device's file on this
    host) gets nothing back: the host figure falls short and explain names the pool."""
    runner, backing = guest
    fill(runner, "np")
    result = trim(ThinVolumeTarget(runner, "np", backing))
    [disk] = result.disks
    assert disk.pool_before is not None and disk.pool_after is not None
    print(
        f"nopassdown: guest {result.guest_trimmed_bytes} B; {disk.measured_by}"
        f" {disk.allocated_before} -> {disk.allocated_after} B; pool"
        f" {disk.pool_before.used_bytes} -> {disk.pool_after.used_bytes} B"
    )
    assert result.guest_trimmed_bytes >= WRITE_MIB * MiB  # the guest trimmed it all
    assert disk.pool_reclaimed is not None and disk.pool_reclaimed >= WRITE_MIB * MiB // 2
    assert disk.reclaimed_bytes is not None and disk.reclaimed_bytes <= 0  # du of the file
    [cause] = [c for c in disk.causes or [] if c.id == "thin_pool_discards"]
    assert cause.facts["discards"] == "nopassdown" == lvs_plain(runner, "vg/np")["discards"]
    assert "discards=nopassdown" in cause.evidence
    assert json.loads(json.dumps(result.to_json()))["causes"][0]["id"] == "thin_pool_discards"


def test_an_ignore_pool_is_the_cause(guest: tuple[Runner, Path]) -> None:
    """With ignore the volume itself refuses FITRIM (its queue has no discard), so no trim
    can run on it here; on a host, the guest's QEMU device still offers discard and the
    guest's figure is what the pool drops. Explain gets the Stack facts vmtrim's probe
    parsed from the guest's real dmsetup and lvs output."""
    from vmtrim.trim.explain import disk_causes

    runner, _ = guest
    out = runner.run(["fstrim", "-v", "/mnt/ig"], timeout=120)
    assert not out.ok and "not supported" in (out.stdout + out.stderr)
    pool = block_stack(runner, "/dev/mapper/vg-tig").pool
    assert pool is not None and pool.discards == lvs_plain(runner, "vg/ig")["discards"]
    [cause] = disk_causes(DiskFacts("vdb", pool=pool))
    assert (cause.id, cause.facts["discards"], cause.facts["pool"]) == (
        "thin_pool_discards",
        "ignore",
        "vg/ig",
    )
    assert "drops every discard" in cause.evidence
