"""ZFS zvols and Ceph RBD images. No ZFS and no Ceph are available here: the parsers
read output exactly as the tools document it (zfs-get(8)/zpool-get(8) -Hp: tab-separated
``name property value source``; ceph src/tools/rbd/action/Info.cc's JSON), and are fuzzed.
What runs for real: this host has neither tool, and the probe says so."""

from __future__ import annotations

import json
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from vmtrim.audit.hostprobe import HostProbes
from vmtrim.model import Verdict
from vmtrim.storage import rbd, zfs
from vmtrim.storage.runner import Output

# zfs get -Hp -o name,property,value,source volblocksize,volsize,refreservation,compression
THICK = (
    "tank/vm-100-disk-0\tvolblocksize\t16384\tdefault\n"
    "tank/vm-100-disk-0\tvolsize\t34359738368\tlocal\n"
    "tank/vm-100-disk-0\trefreservation\t35433480192\tlocal\n"
    "tank/vm-100-disk-0\tcompression\tlz4\tinherited from tank\n"
)
SPARSE = (
    "tank/vm-101-disk-0\tvolblocksize\t8192\t-\n"
    "tank/vm-101-disk-0\tvolsize\t10737418240\tlocal\n"
    "tank/vm-101-disk-0\trefreservation\tnone\tdefault\n"
    "tank/vm-101-disk-0\tcompression\toff\tdefault\n"
)
AUTOTRIM_OFF = "tank\tautotrim\toff\tdefault\n"

# rbd info --format json pool/image (Info.cc: name, id, size, objects, order, object_size,
# snapshot_count, block_name_prefix, format, features, ...)
RBD_INFO = {
    "name": "vm-7-disk-0",
    "id": "5e3a2b8d1f7c",
    "size": 42949672960,
    "objects": 10240,
    "order": 22,
    "object_size": 4194304,
    "snapshot_count": 2,
    "block_name_prefix": "rbd_data.5e3a2b8d1f7c",
    "format": 2,
    "features": ["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"],
    "op_features": [],
    "flags": [],
}


class Canned:
    """A runner with the tools' documented answers (none of them exists on this host)."""

    where = "a ZFS and Ceph host"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.ran: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], *, timeout: float = 30.0) -> Output:
        self.ran.append(tuple(argv))
        text = self.answers.get(argv[0])
        return Output(tuple(argv), 0 if text is not None else 1, text or "", "")

    def read(self, path: str) -> str | None:
        return None

    def device_number(self, path: str) -> tuple[int, int] | None:
        return None


def test_a_thick_zvol_and_its_pool() -> None:
    vol = zfs.parse_zvol("tank/vm-100-disk-0", THICK, AUTOTRIM_OFF)
    assert vol is not None
    assert (vol.volblocksize, vol.volsize, vol.compression) == (16384, 34359738368, "lz4")
    assert vol.refreservation == 35433480192 and vol.thin is False
    assert vol.autotrim == "off"


def test_a_sparse_zvol() -> None:
    vol = zfs.parse_zvol("tank/vm-101-disk-0", SPARSE)
    assert vol is not None and vol.thin is True and vol.compression == "off"
    assert vol.autotrim is None  # zpool get gave nothing
    assert zfs.parse_zvol("tank/other", SPARSE) is None


def test_zvol_paths() -> None:
    assert zfs.dataset_of("/dev/zvol/tank/vm-100-disk-0") == "tank/vm-100-disk-0"
    assert zfs.dataset_of("/dev/zvol/tank/../../etc") is None
    assert zfs.dataset_of("/dev/zd0") is None


def test_the_probe_warns_about_a_thick_zvol() -> None:
    runner = Canned({"zfs": THICK, "zpool": AUTOTRIM_OFF})
    probe = HostProbes(runner=runner).block("/dev/zvol/tank/vm-100-disk-0")
    assert runner.ran[-2][:3] == ("zfs", "get", "-Hp") and runner.ran[-1][:3] == (
        "zpool",
        "get",
        "-Hp",
    )
    assert "zvol tank/vm-100-disk-0" in probe.reason and "volblocksize 16 KiB" in probe.reason
    keys = {note.key for note in probe.notes}
    assert keys == {"zvol_refreservation", "zpool_autotrim_off"}
    (ref,) = [n for n in probe.notes if n.key == "zvol_refreservation"]
    assert "refreservation=35433480192" in ref.message


def test_without_zfs_the_reason_says_so() -> None:
    probe = HostProbes().block("/dev/zvol/tank/vm-100-disk-0")  # this host: no zfs
    assert probe.verdict is Verdict.UNKNOWN
    assert "zvol tank/vm-100-disk-0: zfs is not installed on this host" in probe.reason


def test_rbd_info_gives_the_object_size() -> None:
    image = rbd.parse_info("rbd/vm-7-disk-0", json.dumps(RBD_INFO))
    assert image is not None and image.measured
    assert (image.object_size, image.size, image.snapshots) == (4194304, 42949672960, 2)
    order_only = {k: v for k, v in RBD_INFO.items() if k != "object_size"} | {"order": 23}
    again = rbd.parse_info("x", json.dumps(order_only))
    assert again is not None and again.object_size == 1 << 23


def test_rbd_disk_in_the_probe() -> None:
    runner = Canned({"rbd": json.dumps(RBD_INFO)})
    probe = HostProbes(runner=runner).network("rbd", "rbd://mon1:6789/rbd/vm-7-disk-0")
    assert runner.ran == [("rbd", "info", "--format", "json", "--", "rbd/vm-7-disk-0")]
    (note,) = probe.notes
    assert "object size 4096 KiB (from rbd info)" in note.message
    assert probe.verdict is Verdict.PASS  # the protocol passes discard; the note says how much


def test_rbd_without_the_tool_uses_the_default_not_measured() -> None:
    probe = HostProbes().network("rbd", "rbd://mon1/rbd/vm-7-disk-0")  # no rbd here
    (note,) = probe.notes
    assert (
        f"object size {rbd.DEFAULT_OBJECT_SIZE >> 10} KiB (the default: not measured)"
        in note.message
    )
    # --no-probe and a remote host ask no cluster and add nothing
    assert HostProbes.remote("qemu+ssh://h/system").network("rbd", "rbd://m/p/i").notes == ()
    assert HostProbes.no_probe().network("rbd", "rbd://m/p/i").notes == ()


def test_rbd_source_names() -> None:
    assert rbd.image_of("rbd://mon1:6789,mon2:6789/pool/ns/image") == "pool/ns/image"
    assert rbd.image_of("rbd:///pool/image") == "pool/image"
    assert rbd.image_of("rbd://mon1/--help") is None
    assert rbd.image_of("nbd://h/x") is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)


@given(JSON)
def test_any_json_is_not_an_rbd_image_or_a_sane_one(doc: object) -> None:
    image = rbd.parse_info("x", json.dumps(doc))
    assert image is None or 0 < image.object_size < 1 << 64


@given(st.dictionaries(st.sampled_from(["object_size", "order", "size", "snapshot_count"]), JSON))
def test_rbd_fields_of_any_type(doc: dict[str, object]) -> None:
    image = rbd.parse_info("x", json.dumps(doc))
    assert image is None or image.object_size > 0


@given(st.text(max_size=400))
def test_any_zfs_output(text: str) -> None:
    vol = zfs.parse_zvol("tank/v", text, text)
    if vol is not None:
        assert vol.refreservation is None or vol.refreservation >= 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(zfs.ZFS_PROPS),
            st.text(alphabet="0123456789-nonelz4\t", max_size=24),
        ),
        max_size=8,
    )
)
def test_zfs_lines_with_any_values(rows: list[tuple[str, str]]) -> None:
    text = "".join(f"tank/v\t{prop}\t{value}\tlocal\n" for prop, value in rows)
    zfs.parse_zvol("tank/v", text)


def test_absurd_input_is_bounded() -> None:
    assert rbd.parse_info("x", "[" * 200_000) is None
    assert rbd.parse_info("x", json.dumps({"object_size": 10**30})) is None
    assert zfs.parse_get("tank\tautotrim\t" + "x" * 10_000 + "\tlocal") == {}


def test_the_host_layer_and_the_granularity_stack_ask_each_tool_once() -> None:
    from vmtrim.audit.granularity import granularity_stack
    from vmtrim.model import Disk, StorageKind

    runner = Canned({"zfs": THICK, "zpool": AUTOTRIM_OFF, "rbd": json.dumps(RBD_INFO)})
    probes = HostProbes(runner=runner)
    zvol = Disk("vm", "vda", storage=StorageKind.BLOCK, source="/dev/zvol/tank/vm-100-disk-0")
    net = Disk(
        "vm",
        "vdb",
        storage=StorageKind.NETWORK,
        protocol="rbd",
        source="rbd://mon1:6789/rbd/vm-7-disk-0",
    )
    probes.block("/dev/zvol/tank/vm-100-disk-0")
    probes.network("rbd", "rbd://mon1:6789/rbd/vm-7-disk-0")
    units = [[layer.bytes for layer in granularity_stack(d, None, probes)] for d in (zvol, net)]
    assert sorted(argv[0] for argv in runner.ran) == ["rbd", "zfs", "zpool"]
    assert 16384 in units[0] and 4194304 in units[1]
