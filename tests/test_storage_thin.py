"""dm-thin for real, inside a lab guest: this host's kernel has no device-mapper, the
guest's Debian kernel has dm-thin-pool. The guest's one disk is a loop device on this
host (QEMU host_device, as libvirt renders a ``type='block'`` disk), so a discard that
the pool passes down reaches the loop device, which punches its backing file here.

Every guest step, and the probe itself, runs through vmtrim's Runner over guest-exec.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from granularity_support import connect_agent as connect_agent  # shared (sparsify_support too)
from helpers import du_bytes
from storage_support import loop_device, storage_initrd
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.lab import ensure_appliance
from vmtrim.model import Verdict
from vmtrim.storage.block import block_stack
from vmtrim.storage.files import file_facts
from vmtrim.storage.pool import PoolUsage, pool_under, pool_usage, reclaimed
from vmtrim.storage.runner import AgentRunner, Runner
from vmtrim.vm.guest import DirectGuest, DiskSpec, GuestSpec, make_workdir

MiB = 1 << 20
WRITE_MIB = 48
# Three pools on the one PV: their discard modes are what is compared.
POOLS = {"pd": "passdown", "np": "nopassdown", "ig": "ignore"}


def sh(runner: Runner, *argv: str, timeout: float = 120.0) -> str:
    out = runner.run(list(argv), timeout=timeout)
    assert out.ok, f"{' '.join(argv)}: {out.why()}\n{out.stdout}{out.stderr}"
    return out.stdout


def host_device(argv: list[str]) -> list[str]:
    # The lab gives file nodes; a /dev/loopN is a host_device, as libvirt makes it.
    return [a.replace('"driver":"file"', '"driver":"host_device"') for a in argv]


@pytest.fixture(scope="module")
def guest() -> Iterator[tuple[Runner, Path]]:
    """(runner in the guest, the loop device's backing file on this host)."""
    appliance = ensure_appliance(variant="sparsify")
    work = make_workdir()
    try:
        backing = work / "pv.raw"
        with backing.open("wb") as f:
            f.truncate(640 * MiB)
        initrd = storage_initrd(appliance.initrd, work)
        with loop_device(backing) as loop:
            spec = GuestSpec(
                appliance=dataclasses.replace(appliance, initrd=initrd),
                disk=DiskSpec(Path(loop), "raw", "virtio-blk", "unmap"),
                agent=True,
                control=False,
                extra_cmdline=("rdinit=/vmtrim-storage-init",),
            )
            with DirectGuest(spec, work, subject="thin", rewrite_argv=host_device) as vm:
                agent = connect_agent(vm.paths.agent, time.monotonic() + 300)
                try:
                    runner = AgentRunner(agent, "the thin guest")
                    build_pools(runner)
                    yield runner, backing
                finally:
                    agent.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_pools(runner: Runner) -> None:
    sh(runner, "pvcreate", "-q", "/dev/vda")
    sh(runner, "vgcreate", "-q", "vg", "/dev/vda")
    for name, mode in POOLS.items():
        sh(runner, "lvcreate", "-q", "--type", "thin-pool", "-L", "160m", "--chunksize", "64k",
           "--discards", mode, "-Zn", "-n", name, "vg")  # fmt: skip
        sh(
            runner,
            "lvcreate",
            "-q",
            "-V",
            "192m",
            "--thinpool",
            f"vg/{name}",
            "-n",
            f"t{name}",
            "vg",
        )
        sh(
            runner,
            "mkfs.ext4",
            "-q",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            f"/dev/mapper/vg-t{name}",
            timeout=300,
        )
        sh(runner, "mkdir", "-p", f"/mnt/{name}")
        sh(runner, "mount", "-t", "ext4", f"/dev/mapper/vg-t{name}", f"/mnt/{name}")


def lvs_plain(runner: Runner, lv: str) -> dict[str, str]:
    """lvs's own columns (not its JSON report, which the probe reads) for one LV."""
    fields = ("discards", "chunk_size", "data_percent", "metadata_percent")
    out = sh(runner, "lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|",
             "-o", ",".join(fields), lv)  # fmt: skip
    return dict(zip(fields, (v.strip() for v in out.strip().split("|")), strict=True))


def usage(runner: Runner, name: str) -> PoolUsage:
    found = pool_usage(f"/dev/mapper/vg-t{name}", runner)
    assert found is not None, block_stack(runner, f"/dev/mapper/vg-t{name}").reason()
    return found


def fill_and_trim(
    runner: Runner, name: str, backing: Path
) -> tuple[PoolUsage, PoolUsage, str, tuple[int, int]]:
    """Write, delete and fstrim on the pool's volume: the pool before and after fstrim,
    what fstrim said, and the loop's backing file (du) before and after."""
    sh(runner, "dd", "if=/dev/urandom", f"of=/mnt/{name}/fill", "bs=1M", f"count={WRITE_MIB}",
       "conv=fsync", timeout=300)  # fmt: skip
    sh(runner, "rm", f"/mnt/{name}/fill")
    sh(runner, "sync")
    before, host_before = usage(runner, name), du_bytes(backing)
    trim = runner.run(["fstrim", "-v", f"/mnt/{name}"], timeout=300)
    sh(runner, "sync")
    return before, usage(runner, name), trim.stdout + trim.stderr, (host_before, du_bytes(backing))


@pytest.mark.parametrize("name", list(POOLS))
def test_the_parsed_pool_facts_are_what_lvs_says(guest: tuple[Runner, Path], name: str) -> None:
    runner, _ = guest
    stack = block_stack(runner, f"/dev/mapper/vg-t{name}")
    pool = stack.pool
    assert pool is not None, stack.reason()
    real = lvs_plain(runner, f"vg/{name}")
    assert pool.name == f"vg/{name}"
    assert pool.discards == real["discards"] == POOLS[name]
    assert pool.chunk_bytes == int(real["chunk_size"])
    assert pool.data_percent == float(real["data_percent"])
    assert pool.metadata_percent == float(real["metadata_percent"])
    # dmsetup status (chunks) agrees with lvs's percentage, to its two decimals
    assert pool.used_bytes is not None and pool.total_bytes is not None
    assert abs(100 * pool.used_bytes / pool.total_bytes - float(real["data_percent"])) < 0.01


def test_passdown_pool_gives_space_back_to_the_pool_and_the_host(
    guest: tuple[Runner, Path],
) -> None:
    runner, backing = guest
    before, after, said, (host_before, host_after) = fill_and_trim(runner, "pd", backing)
    gave = reclaimed(before, after)
    print(
        f"passdown: pool {before.used_bytes} -> {after.used_bytes} B,"
        f" host {host_before} -> {host_after} B; {said.strip()}"
    )
    assert gave is not None and gave >= WRITE_MIB * MiB // 2, (before, after, said)
    assert float(lvs_plain(runner, "vg/pd")["data_percent"]) < (before.data_percent or 0)
    # passdown: the pool discarded its data device, the guest's disk: the loop device
    # on this host, which punched its backing file
    assert host_after <= host_before - WRITE_MIB * MiB // 2, (host_before, host_after)
    probe = HostProbes(runner=runner).block("/dev/mapper/vg-tpd")
    assert probe.verdict is Verdict.PASS and "discards=passdown" in probe.reason
    (chunk,) = [note for note in probe.notes if note.key == "thin_chunk"]
    assert (
        f"whole {int(lvs_plain(runner, 'vg/pd')['chunk_size']) >> 10} KiB chunks" in chunk.message
    )


def test_nopassdown_pool_frees_chunks_but_the_host_keeps_the_space(
    guest: tuple[Runner, Path],
) -> None:
    runner, backing = guest
    before, after, said, (host_before, host_after) = fill_and_trim(runner, "np", backing)
    print(
        f"nopassdown: pool {before.used_bytes} -> {after.used_bytes} B,"
        f" host {host_before} -> {host_after} B; {said.strip()}"
    )
    gave = reclaimed(before, after)
    assert gave is not None and gave >= WRITE_MIB * MiB // 2, (before, after, said)
    # the pool unmapped the chunks but sent no discard to its data device: the loop's
    # backing file on this host keeps every byte
    assert host_after >= host_before
    probe = HostProbes(runner=runner).block("/dev/mapper/vg-tnp")
    assert probe.verdict is Verdict.PASS and "not passed to the pool's data device" in probe.reason


def test_ignore_pool_keeps_its_chunks(guest: tuple[Runner, Path]) -> None:
    runner, backing = guest
    before, after, said, (host_before, host_after) = fill_and_trim(runner, "ig", backing)
    assert before.used_bytes is not None and before.used_bytes >= WRITE_MIB * MiB
    print(
        f"ignore: pool {before.used_bytes} -> {after.used_bytes} B,"
        f" host {host_before} -> {host_after} B; {said.strip()}"
    )
    assert reclaimed(before, after) == 0, said
    assert host_after >= host_before  # nothing reached the loop device either
    assert lvs_plain(runner, "vg/ig")["data_percent"] == f"{before.data_percent:.2f}"
    probe = HostProbes(runner=runner).block("/dev/mapper/vg-tig")
    assert probe.verdict is Verdict.BLOCK and "ignores discards" in probe.reason
    assert probe.fix is not None and "lvchange --discards passdown vg/ig" in probe.fix


def test_an_image_file_on_a_thin_volume_finds_its_pool(guest: tuple[Runner, Path]) -> None:
    runner, _ = guest
    sh(runner, "dd", "if=/dev/zero", "of=/mnt/pd/disk.raw", "bs=1M", "count=1")
    # the mount's source, as the guest's own mount table says
    source = sh(runner, "cat", "/proc/self/mounts").split("/mnt/pd ", 1)[0].split()[-1]
    found = pool_under("/mnt/pd/disk.raw", runner)
    assert found is not None and found == pool_usage(source, runner)
    assert found.pool == "vg/pd" and found.discards == lvs_plain(runner, "vg/pd")["discards"]


def test_a_linear_volume_is_followed_to_its_leg(guest: tuple[Runner, Path]) -> None:
    runner, _ = guest
    sh(runner, "lvcreate", "-q", "-L", "16m", "-n", "lin", "vg")
    stack = block_stack(runner, "/dev/mapper/vg-lin")
    # dmsetup's own table names the leg by MAJ:MIN; the guest's sysfs names that device
    (leg,) = sh(runner, "dmsetup", "table", "vg-lin").split()[3:4]
    uevent = sh(runner, "cat", f"/sys/dev/block/{leg}/uevent")
    leg_name = next(x.split("=", 1)[1] for x in uevent.splitlines() if x.startswith("DEVNAME="))
    assert [layer.kind for layer in stack.layers] == ["dm-linear", "disk"]
    assert stack.layers[1].name == leg_name
    for layer in stack.layers:
        max_bytes = sh(runner, "cat", f"/sys/class/block/{layer.name}/queue/discard_max_bytes")
        assert layer.verdict is (Verdict.PASS if int(max_bytes) > 0 else Verdict.BLOCK)
        assert f"discard_max_bytes={max_bytes.strip()}" in layer.reason


def test_a_filesystem_on_a_thin_volume_says_who_must_discard(guest: tuple[Runner, Path]) -> None:
    runner, _ = guest
    mount = file_facts(runner, "/mnt/pd").mount
    assert mount is not None and mount.source == "/dev/mapper/vg-tpd"
    under = HostProbes(runner=runner).filesystem_device(mount)
    assert under.pool is not None and under.pool.name == "vg/pd"
    (note,) = [n for n in under.notes if n.key == "thin_under_filesystem"]
    # the guest's mount has no discard option (init mounted it plain): fstrim is the advice
    assert (
        "discard" not in sh(runner, "cat", "/proc/self/mounts").split("/mnt/pd ", 1)[1].split()[1]
    )
    assert "run fstrim on the host (fstrim /mnt/pd" in note.message
