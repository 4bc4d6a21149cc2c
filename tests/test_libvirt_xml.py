"""libvirt domain XML -> model, on a varied test set; fuzzed with hypothesis."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.model import DeviceType, DiskReport, LayerKind, StorageKind, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_file, parse_domain_xml

DATA = Path(__file__).parent / "data" / "audit"
OFFLINE = HostProbes(local=False)


@pytest.fixture(scope="module")
def zoo() -> dict[str, DiskReport]:
    domain = parse_domain_file(str(DATA / "zoo.xml"))
    assert domain.machine == "pc-q35-7.2" and domain.name == "zoo"
    return {r.disk.target or r.disk.ident: r for r in audit_domain(domain, OFFLINE)}


def verdicts(report: DiskReport) -> dict[str, str]:
    return {layer.kind.value: layer.verdict.value for layer in report.layers}


def test_every_disk_and_the_scsi_hostdev_are_listed(zoo: dict[str, DiskReport]) -> None:
    assert list(zoo) == [
        "vda",
        "vdb",
        "vdc",
        "vdd",
        "vde",
        "sda",
        "sdb",
        "sdc",
        "sdd",
        "sde",
        "sdf",
        "sdg",
        "sdh",
        "sdi",
        "fda",
        "sdj",
        "sdk",
        "ua-notarget",
        "hostdev0",
    ]


def test_storage_kinds_and_sources(zoo: dict[str, DiskReport]) -> None:
    kinds = {name: (r.disk.storage, r.disk.protocol) for name, r in zoo.items()}
    assert kinds["vdb"] == (StorageKind.BLOCK, None)
    assert kinds["vdc"] == (StorageKind.NVME, "nvme")
    assert kinds["vdd"] == (StorageKind.VOLUME, None)
    assert kinds["sda"] == (StorageKind.NETWORK, "rbd")
    assert kinds["sdg"][0] is StorageKind.NONE
    assert zoo["sda"].disk.source == "rbd://mon1.example:6789,mon2.example:6789/rbdpool/zoo-disk"
    assert zoo["sde"].disk.source == "https://cdimage.example:443/debian/debian-12.iso"
    assert zoo["vdd"].disk.source == "default/zoo-vol.qcow2"


def test_network_protocols_at_the_host_layer(zoo: dict[str, DiskReport]) -> None:
    host = {
        name: zoo[name].layer(LayerKind.HOST_STORAGE).verdict
        for name in ("sda", "sdb", "sdc", "vdc", "vdd")
    }
    assert host == {
        "sda": Verdict.PASS,
        "sdb": Verdict.PASS,
        "sdc": Verdict.UNKNOWN,
        "vdc": Verdict.PASS,
        "vdd": Verdict.UNKNOWN,
    }
    assert "pool volume" in zoo["vdd"].layer(LayerKind.HOST_STORAGE).reason
    assert "server" in zoo["sdc"].layer(LayerKind.HOST_STORAGE).reason


def test_controllers_and_devices(zoo: dict[str, DiskReport]) -> None:
    assert (zoo["sda"].disk.controller_model, zoo["sda"].disk.qemu_device) == (
        "virtio-scsi",
        "scsi-hd",
    )
    assert (zoo["sdd"].disk.controller_model, zoo["sdd"].disk.qemu_device) == (
        "lsilogic",
        "scsi-block",
    )
    assert zoo["sdh"].disk.qemu_device == "ide-hd" and zoo["sdh"].disk.bus == "sata"
    assert zoo["sdi"].disk.qemu_device == "usb-storage"
    assert zoo["fda"].disk.device is DeviceType.FLOPPY
    assert zoo["hostdev0"].disk.device is DeviceType.LUN


def test_verdicts_per_layer(zoo: dict[str, DiskReport]) -> None:
    assert zoo["vda"].config_verdict is Verdict.PASS
    assert verdicts(zoo["vdb"])["block_node"] == "block"
    assert zoo["sdj"].layer(LayerKind.BLOCK_NODE).reason.count("discard=ignore") == 1
    # passthrough LUNs carry UNMAP themselves: discard= does not matter
    assert verdicts(zoo["sdd"])["block_node"] == "pass"
    assert verdicts(zoo["hostdev0"])["device"] == "pass"
    assert verdicts(zoo["fda"])["device"] == "block" and zoo["fda"].blocks
    assert verdicts(zoo["sdi"])["guest_driver"] == "unknown"
    assert zoo["ua-notarget"].verdict is Verdict.BLOCK  # no target, still audited


def test_read_only_and_empty_are_exempt(zoo: dict[str, DiskReport]) -> None:
    exempt = {name: r.exempt for name, r in zoo.items() if r.exempt}
    assert set(exempt) == {"sde", "sdf", "sdg", "sdj"}
    assert "shareable" in str(exempt["sdj"])
    assert zoo["sdg"].exempt == "cdrom" and zoo["sdg"].disk.empty


def test_backing_chain_is_followed(zoo: dict[str, DiskReport]) -> None:
    node = zoo["vde"].disk.node
    assert node is not None
    chain = []
    while node.backing is not None:
        node = node.backing
        chain.append((node.driver, node.filename))
    assert chain == [
        ("qcow2", "/var/lib/libvirt/images/zoo-mid.qcow2"),
        ("raw", "/var/lib/libvirt/images/zoo-base.raw"),
    ]
    assert any("backing file never shrinks" in f.message for f in zoo["vde"].findings)


def test_detect_zeroes_without_discard_is_flagged(zoo: dict[str, DiskReport]) -> None:
    messages = [f.message for f in zoo["sdk"].findings]
    assert any("detect_zeroes=unmap needs discard=unmap" in m for m in messages)


def test_pci_hostdev_is_a_note_not_a_disk() -> None:
    domain = parse_domain_file(str(DATA / "zoo.xml"))
    assert any("hostdev pci" in note for note in domain.notes)


def test_target_bus_guessed_from_dev_name() -> None:
    domain = parse_domain_xml(
        "<domain><name>g</name><devices><disk type='file'>"
        "<source file='/x'/><target dev='vdz'/></disk></devices></domain>"
    )
    assert domain.disks[0].bus == "virtio"


def test_domstatus_wrapper_is_accepted() -> None:
    domain = parse_domain_xml(
        "<domstatus state='running'><domain><name>s</name></domain></domstatus>"
    )
    assert domain.name == "s" and domain.disks == []


@pytest.mark.parametrize(
    "text",
    ["", "<domain", "<?xml version='1.0'?>", "<a/><b/>", "<domain xmlns='urn:x'/>", "\xff\xfe"],
)
def test_broken_documents_are_bad_input(text: str) -> None:
    with pytest.raises(BadInput):
        parse_domain_xml(text, subject="t.xml")


_ELEMENTS = st.sampled_from(
    [
        "disk",
        "source",
        "target",
        "driver",
        "backingStore",
        "format",
        "readonly",
        "controller",
        "hostdev",
        "address",
        "adapter",
        "host",
        "devices",
        "os",
        "type",
        "name",
        "alias",
        "shareable",
    ]
)
_ATTRS = st.dictionaries(
    st.sampled_from(
        [
            "type",
            "device",
            "dev",
            "bus",
            "file",
            "protocol",
            "name",
            "discard",
            "detect_zeroes",
            "controller",
            "index",
            "model",
            "machine",
            "pool",
            "volume",
            "dir",
            "port",
            "cache",
            "discard_no_unref",
        ]
    ),
    st.sampled_from(
        [
            "file",
            "block",
            "network",
            "volume",
            "dir",
            "nvme",
            "disk",
            "cdrom",
            "lun",
            "floppy",
            "scsi",
            "virtio",
            "ide",
            "usb",
            "fdc",
            "sata",
            "unmap",
            "ignore",
            "0",
            "1",
            "rbd",
            "/x",
            "",
            "pc-i440fx-3.1",
            "virtio-scsi",
            "&amp;",
        ]
    ),
    max_size=4,
)


@st.composite
def xml_trees(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(_ELEMENTS)
    attrs = "".join(f" {k}='{v}'" for k, v in draw(_ATTRS).items())
    children = "" if depth > 2 else "".join(draw(st.lists(xml_trees(depth + 1), max_size=3)))
    return f"<{tag}{attrs}>{children}</{tag}>"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(xml_trees(), max_size=4), st.sampled_from(["domain", "domstatus", "vm"]))
def test_fuzz_structured_xml_never_crashes(children: list[str], root: str) -> None:
    text = f"<{root}><name>f</name><devices>{''.join(children)}</devices></{root}>"
    try:
        domain = parse_domain_xml(text)
    except BadInput:
        return
    audit_domain(domain, OFFLINE, read_images=False)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_text_is_bad_input_or_parses(text: str) -> None:
    try:
        domain = parse_domain_xml(text)
    except BadInput:
        return
    audit_domain(domain, OFFLINE, read_images=False)


def test_dir_disk_and_nvme_bus() -> None:
    domain = parse_domain_xml(
        "<domain><name>d</name><os><type machine='pc-q35-7.2'>hvm</type></os><devices>"
        "<disk type='dir' device='disk'><driver name='qemu' type='fat'/>"
        "<source dir='/srv/share'/><target dev='sdx' bus='usb'/><readonly/></disk>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw' discard='unmap'/>"
        "<source file='/srv/n.img'/><target dev='nvme0n1' bus='nvme'/></disk>"
        "</devices></domain>"
    )
    fat, nvme = audit_domain(domain, OFFLINE, read_images=False)
    assert (fat.disk.storage, fat.disk.protocol, fat.exempt) == (
        StorageKind.DIR,
        "vvfat",
        "read-only",
    )
    assert fat.layer(LayerKind.HOST_STORAGE).verdict is Verdict.BLOCK
    assert (nvme.disk.qemu_device, nvme.layer(LayerKind.DEVICE).verdict) == (
        "nvme-ns",
        Verdict.PASS,
    )
    assert nvme.config_verdict is Verdict.PASS
