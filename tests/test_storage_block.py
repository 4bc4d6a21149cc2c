"""The layers under a block device: real loop devices on this host (followed down to the
backing file's filesystem), and device-mapper/md output as the kernel documents it
(this host has neither; dm-thin runs for real in tests/test_storage_thin.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_support import filesystem, loop_device, mounted, run
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.facts import NOTES
from vmtrim.model import LayerKind, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.storage import dm
from vmtrim.storage.block import block_stack
from vmtrim.storage.pool import pool_under
from vmtrim.storage.runner import LocalRunner, Output, stat_device_number

MiB = 1 << 20


@pytest.fixture
def ext4_loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.raw"
    with backing.open("wb") as f:
        f.truncate(16 * MiB)
    with loop_device(backing) as device:
        yield device, backing


def block_xml(device: str) -> str:
    return (
        "<domain><name>b</name><os><type machine='pc-q35-7.2'>hvm</type></os><devices>"
        "<disk type='block' device='disk'><driver name='qemu' type='raw' discard='unmap'/>"
        f"<source dev='{device}'/><target dev='sda' bus='scsi'/></disk>"
        "<controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>"
    )


def test_a_loop_device_is_followed_to_its_backing_file(ext4_loop: tuple[str, Path]) -> None:
    device, backing = ext4_loop
    stack = block_stack(LocalRunner(), device)
    # losetup's own answer for the file behind the device
    assert stack.backing_file == run("losetup", "-n", "-O", "BACK-FILE", device)
    probe = HostProbes().block(device)
    loop, file = probe.layers
    assert (loop.kind, file.kind) == ("loop", "file")
    assert loop.name == Path(device).name and file.name == str(backing)
    sysfs = Path(f"/sys/block/{loop.name}/queue/discard_max_bytes").read_text().strip()
    assert f"discard_max_bytes={sysfs}" in loop.reason
    fstype = run("findmnt", "-n", "-o", "FSTYPE", "--target", str(backing))
    assert f"{fstype} at" in file.reason and "punches holes" in file.reason
    assert probe.verdict is Verdict.PASS


def test_a_libvirt_block_disk_on_a_loop_device_reports_both_layers(
    ext4_loop: tuple[str, Path],
) -> None:
    device, backing = ext4_loop
    (report,) = audit_domain(parse_domain_xml(block_xml(device)), HostProbes())
    host = report.layer(LayerKind.HOST_STORAGE)
    assert host.verdict is Verdict.PASS
    assert f"backed by {backing}" in host.reason and "punches holes" in host.reason


def test_a_loop_device_over_ramfs_blocks_at_both_layers(tmp_path: Path) -> None:
    with mounted("vmtrim-test-ramfs", tmp_path / "ramfs", fstype="ramfs") as mnt:
        backing = mnt / "backing.raw"
        backing.write_bytes(b"\0" * (4 * MiB))
        with loop_device(backing) as device:
            probe = HostProbes().block(device)
    assert probe.verdict is Verdict.BLOCK
    loop, file = probe.layers
    assert loop.verdict is Verdict.BLOCK and "discard_max_bytes=0" in loop.reason
    assert file.verdict is Verdict.BLOCK and f"ramfs at {mnt} cannot punch holes" in file.reason
    assert probe.fix is not None and "restart the guest's QEMU" in probe.fix


def test_the_host_layers_notes_are_the_disks_findings(tmp_path: Path) -> None:
    with mounted("vmtrim-test-ramfs", tmp_path / "ramfs", fstype="ramfs") as mnt:
        backing = mnt / "backing.raw"
        backing.write_bytes(b"\0" * MiB)
        with loop_device(backing) as device:
            (report,) = audit_domain(parse_domain_xml(block_xml(device)), HostProbes())
    sticky = NOTES["punch_hole_sticky"]
    assert any(
        f.layer is LayerKind.HOST_STORAGE
        and f.message == sticky.message
        and f.source == sticky.source
        for f in report.findings
    )


def test_no_thin_pool_under_a_file_or_loop_here(ext4_loop: tuple[str, Path]) -> None:
    device, backing = ext4_loop
    assert pool_under(str(backing)) is None and pool_under(device) is None


def test_not_a_block_device_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "f").touch()
    stack = block_stack(LocalRunner(), str(tmp_path / "f"))
    assert stack.verdict is Verdict.UNKNOWN
    assert stack.reason() == f"{tmp_path / 'f'}: not a block device on this host"


# ---------------------------------------------------------------- dmsetup formats

# Lines in the formats of Documentation/admin-guide/device-mapper/thin-provisioning.rst,
# dm-crypt.rst, striped.rst and linear.rst.
POOL_TABLE = "0 20971520 thin-pool 253:0 253:1 128 32768 1 skip_block_zeroing"
POOL_TABLE_IGNORE = "0 20971520 thin-pool 253:0 253:1 1024 0 2 skip_block_zeroing ignore_discard"
POOL_TABLE_NOPASS = "0 20971520 thin-pool 253:0 253:1 128 0 1 no_discard_passdown"
POOL_STATUS = (
    "0 20971520 thin-pool 3 1290/524288 61440/163840 - rw discard_passdown queue_if_no_space - 1024"
)
CRYPT = "0 2097152 crypt aes-xts-plain64 :64:logon:cryptsetup:3f0d-key 0 8:16 4096 1 allow_discards"
CRYPT_NO = "0 2097152 crypt aes-xts-plain64 0000000000000000000000000000000000000000 0 8:16 4096"
STRIPED = "0 1024 striped 2 256 8:16 0 8:32 0"
ALL = (
    "vg-pool_tmeta: 0 8192 linear 252:0 2048\n"
    "vg-pool-tpool: 0 524288 thin-pool 253:0 253:1 128 0 0\n"
    "vg-thin: 0 393216 thin 253:2 1\n"
)


def line(text: str) -> dm.Target:
    (target,) = dm.parse_lines(text)
    return target


def test_thin_pool_table_modes_and_chunk() -> None:
    modes = {
        t: dm.thin_pool_table(line(t)) for t in (POOL_TABLE, POOL_TABLE_IGNORE, POOL_TABLE_NOPASS)
    }
    assert [(m.discards, m.block_bytes) for m in modes.values() if m] == [
        ("passdown", 128 * 512),
        ("ignore", 1024 * 512),
        ("nopassdown", 128 * 512),
    ]


def test_thin_pool_status() -> None:
    status = dm.thin_pool_status(line(POOL_STATUS))
    assert status is not None
    assert (status.used_data, status.total_data, status.used_meta) == (61440, 163840, 1290)
    assert status.data_percent == 100 * 61440 / 163840 and status.discard_passdown is True
    assert status.mode == "rw" and not status.needs_check
    assert dm.thin_pool_status(line("0 20971520 thin-pool Fail")) is None


def test_every_device_listing_keeps_names() -> None:
    targets = dm.parse_lines(ALL)
    assert [(t.name, t.target) for t in targets] == [
        ("vg-pool_tmeta", "linear"),
        ("vg-pool-tpool", "thin-pool"),
        ("vg-thin", "thin"),
    ]
    thin = dm.thin_table(targets[2])
    assert thin == dm.ThinTable("253:2", 1)


def test_crypt_allow_discards_and_no_key_kept() -> None:
    assert dm.crypt_allows_discards(line(CRYPT)) is True
    assert dm.crypt_allows_discards(line(CRYPT_NO)) is False
    assert dm.crypt_allows_discards(line(STRIPED)) is None


def test_linear_and_striped_legs() -> None:
    assert dm.legs(line(STRIPED)) == ["8:16", "8:32"]
    assert dm.legs(line("0 8192 linear 252:0 2048")) == ["252:0"]


class Sysfs:
    """A runner over a directory laid out like /sys plus canned command output, for the
    layers this host's kernel lacks (md, device-mapper)."""

    where = "a test host"

    def __init__(self, root: Path, commands: dict[tuple[str, ...], str]) -> None:
        self.root, self.commands = root, commands

    def run(self, argv: Sequence[str], *, timeout: float = 30.0) -> Output:
        args = tuple(argv)
        if args in self.commands:
            return Output(args, 0, self.commands[args])
        return Output(args, 1, "", f"{args[0]}: no such device")

    def read(self, path: str) -> str | None:
        try:
            return (self.root / path.lstrip("/")).read_text()
        except OSError:
            return None

    def device_number(self, path: str) -> tuple[int, int] | None:
        return stat_device_number(self, path)


def sysfs(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")


def test_md_raid_and_dm_striped_legs(tmp_path: Path) -> None:
    sysfs(
        tmp_path,
        {
            "sys/dev/block/9:0/uevent": "MAJOR=9\nMINOR=0\nDEVNAME=md0\nDEVTYPE=disk",
            "sys/class/block/md0/md/level": "raid1",
            "sys/class/block/md0/queue/discard_max_bytes": "2147450880",
            "sys/class/block/md0/queue/discard_granularity": "4096",
            "sys/dev/block/253:4/uevent": "MAJOR=253\nMINOR=4\nDEVNAME=dm-4",
            "sys/class/block/dm-4/dm/name": "vg-striped",
            "sys/class/block/dm-4/dm/uuid": "LVM-abc",
            "sys/class/block/dm-4/queue/discard_max_bytes": "0",
            "sys/dev/block/8:16/uevent": "MAJOR=8\nMINOR=16\nDEVNAME=sdb",
            "sys/class/block/sdb/queue/discard_max_bytes": "0",
            "sys/dev/block/8:32/uevent": "MAJOR=8\nMINOR=32\nDEVNAME=sdc",
            "sys/class/block/sdc/queue/discard_max_bytes": "4294966784",
        },
    )
    commands = {
        ("stat", "-L", "-c", "%t:%T", "/dev/md0"): "9:0\n",
        ("stat", "-L", "-c", "%t:%T", "/dev/vg/striped"): "fd:4\n",
        ("dmsetup", "table", "vg-striped"): STRIPED + "\n",
    }
    runner = Sysfs(tmp_path, commands)
    md = block_stack(runner, "/dev/md0")
    assert md.verdict is Verdict.PASS and "md0 (md raid1) passes discards" in md.reason()
    striped = block_stack(runner, "/dev/vg/striped")
    assert [(layer.name, layer.verdict) for layer in striped.layers] == [
        ("dm-4", Verdict.BLOCK),
        ("sdb", Verdict.BLOCK),
        ("sdc", Verdict.PASS),
    ]


# ---------------------------------------------------------------- lvs JSON (lvmreport(7))

LVS = {
    "report": [
        {
            "lv": [
                {"lv_name": "pool", "vg_name": "vg", "lv_attr": "twi-aotz--", "pool_lv": "",
                 "data_percent": "26.03", "metadata_percent": "10.94", "chunk_size": "65536",
                 "discards": "passdown", "lv_size": "268435456"},
                {"lv_name": "thin", "vg_name": "vg", "lv_attr": "Vwi-aotz--", "pool_lv": "pool",
                 "data_percent": "35.40", "metadata_percent": "", "chunk_size": "0",
                 "discards": "", "lv_size": "201326592"},
            ]
        }
    ]
}  # fmt: skip


def test_lvs_report() -> None:
    pool, thin = dm.parse_lvs(json.dumps(LVS))
    assert pool.is_thin_pool and pool.full_name == "vg/pool" and pool.chunk_bytes == 65536
    assert (pool.data_percent, pool.metadata_percent, pool.discards) == (26.03, 10.94, "passdown")
    assert thin.is_thin and thin.pool == "pool" and thin.metadata_percent is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64.00k", 65536), ("1.00m", 1 << 20), ("512.00B", 512), ("2.00K", 2000), ("8s", 4096)],
)
def test_lvs_sizes_with_units(text: str, expected: int) -> None:
    assert dm.parse_size(text) == expected


# ---------------------------------------------------------------- hostile output

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)


@given(st.text(max_size=400))
def test_any_dmsetup_output_parses_or_is_skipped(text: str) -> None:
    for target in dm.parse_lines(text):
        dm.thin_pool_table(target)
        dm.thin_pool_status(target)
        dm.thin_table(target)
        dm.crypt_allows_discards(target)
        assert len(dm.legs(target)) <= 1024


@given(JSON)
def test_any_json_is_no_lvs_report_or_a_safe_one(doc: object) -> None:
    for lv in dm.parse_lvs(json.dumps(doc)):
        assert lv.name and lv.vg


@given(st.text(max_size=40))
def test_any_size_text(text: str) -> None:
    size = dm.parse_size(text)
    assert size is None or size >= 0


def test_huge_and_deep_inputs_are_bounded() -> None:
    assert dm.parse_lvs("[" * 100_000 + "]" * 100_000) == []
    assert dm.parse_lines("0 1 striped 99999999 8 " + "8:1 0 " * 5000)[0].args[0] == "99999999"
    assert len(dm.legs(line("0 1 striped 99999999 8 " + "8:1 0 " * 5000))) == 1024


def test_dm_crypt_without_allow_discards_blocks_with_the_cryptsetup_fix(tmp_path: Path) -> None:
    sysfs(
        tmp_path,
        {
            "sys/dev/block/253:5/uevent": "MAJOR=253\nMINOR=5\nDEVNAME=dm-5",
            "sys/class/block/dm-5/dm/name": "luks-root",
            "sys/class/block/dm-5/dm/uuid": "CRYPT-LUKS2-0123-luks-root",
            "sys/class/block/dm-5/queue/discard_max_bytes": "0",
            "sys/dev/block/8:16/uevent": "MAJOR=8\nMINOR=16\nDEVNAME=sdb",
            "sys/class/block/sdb/queue/discard_max_bytes": "2147450880",
        },
    )
    stat = ("stat", "-L", "-c", "%t:%T", "/dev/mapper/luks-root")
    closed = Sysfs(tmp_path, {stat: "fd:5\n", ("dmsetup", "table", "luks-root"): CRYPT_NO})
    probe = HostProbes(runner=closed).block("/dev/mapper/luks-root")
    assert probe.verdict is Verdict.BLOCK and "without allow_discards" in probe.reason
    assert probe.fix is not None and "cryptsetup refresh --allow-discards" in probe.fix
    allowed = Sysfs(tmp_path, {stat: "fd:5\n", ("dmsetup", "table", "luks-root"): CRYPT})
    layers = block_stack(allowed, "/dev/mapper/luks-root").layers
    assert [(la.kind, la.name, la.verdict) for la in layers] == [
        ("dm-crypt", "dm-5", Verdict.PASS),
        ("disk", "sdb", Verdict.PASS),
    ]


def test_an_image_on_a_filesystem_on_a_loop_device_shows_the_loop(tmp_path: Path) -> None:
    with filesystem("xfs", tmp_path) as mnt:
        image = mnt / "disk.raw"
        image.touch()
        device = run("findmnt", "-n", "-o", "SOURCE", "--target", str(mnt))
        probe = HostProbes().file(str(image))
    assert probe.verdict is Verdict.PASS and probe.reason.startswith(f"xfs at {mnt} punches holes")
    assert f"under it: {Path(device).name} passes discards" in probe.reason
    assert f"backed by {tmp_path / 'xfs.img'}" in probe.reason
    assert [layer.kind for layer in probe.layers] == ["loop"] and probe.pool is None
