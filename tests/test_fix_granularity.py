"""`vmtrim fix --discard-granularity auto|BYTES` and `--ssd`, on files (no VM).

How the device property gets to QEMU depends on the libvirt release, and only libvirt
9.0 runs here: its <qemu:override> route is proven on a real guest in
test_fix_libvirt_guest.py, and a QEMU command line in test_fix_qemu_guest.py. The
libvirt >= 10.0 ``<blockio discard_granularity>`` output and the pre-8.2
``<qemu:commandline> -set`` output are checked here as golden files (every input under
tests/data/fix/granularity/ has ``NAME.VARIANT.out``, the whole text ``-o`` writes, and
``NAME.VARIANT.fix.json``); the ones libvirt 9.0's own schema knows are validated by
``virt-xml-validate``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from fix_support import DATA, materialize
from helpers import assert_golden, normalise, vmtrim
from vmtrim.errors import BadInput
from vmtrim.fix.policy import parse_granularity

GOLDEN = DATA / "granularity"
QEMU_NS = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}
DEVICE = ["--discard-granularity", "64K", "--ssd"]

# (input, variant, options): the variant names the golden files.
CASES = [
    ("windows.xml", "libvirt-10.0", [*DEVICE, "--libvirt-version", "10.0"]),
    ("windows.xml", "libvirt-9.0", [*DEVICE, "--libvirt-version", "9.0"]),
    ("windows.xml", "libvirt-8.0", [*DEVICE, "--libvirt-version", "8.0"]),
    ("windows.xml", "libvirt-7.0", [*DEVICE, "--libvirt-version", "7.0"]),
    (
        "windows.xml",
        "libvirt-9.0-bus-scsi",
        [*DEVICE, "--libvirt-version", "9.0.0", "--bus", "scsi", "--all-disks"],
    ),
    ("existing-qemu.xml", "libvirt-9.0", [*DEVICE, "--libvirt-version", "9.0"]),
    ("existing-qemu.xml", "libvirt-8.0", [*DEVICE, "--libvirt-version", "8.0"]),
    ("existing-qemu.xml", "libvirt-10.0", [*DEVICE, "--libvirt-version", "10.0"]),
    ("windows.args", "64k-ssd", DEVICE),
    (
        "windows.args",
        "32k-modernize",
        ["--discard-granularity", "32K", "--ssd", "--modernize", "--bus", "scsi"],
    ),
]


def run_case(name: str, options: list[str], tmp_path: Path) -> tuple[dict[str, object], str]:
    source = tmp_path / Path(name).name
    source.write_text(materialize(f"granularity/{name}", tmp_path))
    out = tmp_path / "fixed"
    kind = "--xml" if name.endswith(".xml") else "--qemu-args"
    done = vmtrim("fix", "--no-probe", "--json", *options, kind, str(source), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return json.loads(done.stdout), out.read_text()


@pytest.mark.parametrize(
    ("name", "variant", "options"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_output_is_the_golden_file(
    name: str, variant: str, options: list[str], tmp_path: Path
) -> None:
    doc, text = run_case(name, options, tmp_path)
    assert_golden(normalise(text, tmp_path), GOLDEN / f"{name}.{variant}.out")
    body = json.dumps(doc, indent=2) + "\n"
    assert_golden(normalise(body, tmp_path), GOLDEN / f"{name}.{variant}.fix.json")
    # A second run over the fixed text changes nothing.
    again = tmp_path / f"again-{Path(name).name}"
    again.write_text(text)
    kind = "--xml" if name.endswith(".xml") else "--qemu-args"
    second = vmtrim("fix", "--no-probe", "--json", *options, kind, str(again), "--dry-run")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changes"] == []


def test_no_golden_file_without_its_case() -> None:
    expected = {f"{n}.{v}{s}" for n, v, _ in CASES for s in (".out", ".fix.json")}
    inputs = {n for n, _, _ in CASES}
    on_disk = {p.name for p in GOLDEN.iterdir()} - inputs
    assert on_disk == expected


def settings(doc: dict[str, object]) -> dict[tuple[str, str], str | None]:
    changes = doc["changes"]
    assert isinstance(changes, list)
    return {(c["disk"], c["setting"]): c["new"] for c in changes}


def test_libvirt_10_uses_blockio_and_target(tmp_path: Path) -> None:
    doc, text = run_case("windows.xml", [*DEVICE, "--libvirt-version", "10.0.0"], tmp_path)
    root = etree.fromstring(text.encode())
    disks = {d.find("target").get("dev"): d for d in root.iterfind("devices/disk")}  # type: ignore[union-attr]
    blockio = disks["sda"].find("blockio")
    assert blockio is not None and blockio.get("discard_granularity") == "65536"
    assert disks["sda"].find("target").get("rotation_rate") == "1"  # type: ignore[union-attr]
    # libvirt's order: <blockio> right before <target> (read back from libvirt 9.0).
    assert [c.tag for c in disks["sda"]][:4] == ["driver", "source", "blockio", "target"]
    assert disks["vda"].find("blockio").get("discard_granularity") == "65536"  # type: ignore[union-attr]
    assert disks["sdb"].find("blockio") is None  # SATA: ide-hd takes 512 only
    assert disks["sdc"].find("blockio") is None  # the cdrom is left alone
    assert root.find("qemu:override", QEMU_NS) is None and "xmlns:qemu" not in text
    warnings = doc["warnings"]
    assert isinstance(warnings, list)
    assert any(w.startswith("sdb: discard_granularity not set: ide-hd") for w in warnings)
    assert any(
        w.startswith("vda: --ssd not set: virtio-blk has no rotation_rate") for w in warnings
    )


def test_libvirt_7_sets_both_with_qemu_commandline(tmp_path: Path) -> None:
    _, text = run_case("windows.xml", [*DEVICE, "--libvirt-version", "7.0"], tmp_path)
    root = etree.fromstring(text.encode())
    args = [a.get("value") for a in root.iterfind("qemu:commandline/qemu:arg", QEMU_NS)]
    assert args == [
        "-set", "device.ua-vmtrim-sda.discard_granularity=65536",
        "-set", "device.ua-vmtrim-sda.rotation_rate=1",
        "-set", "device.ua-vmtrim-vda.discard_granularity=65536",
        "-set", "device.ua-vmtrim-sdb.rotation_rate=1",
    ]  # fmt: skip
    aliases = [a.get("name") for a in root.iterfind("devices/disk/alias")]
    assert aliases == ["ua-vmtrim-sda", "ua-vmtrim-vda", "ua-vmtrim-sdb"]
    assert root.find("devices/disk/target[@rotation_rate]") is None  # libvirt 7.3 has it


def test_existing_qemu_elements_are_updated_in_place(tmp_path: Path) -> None:
    doc, text = run_case("existing-qemu.xml", [*DEVICE, "--libvirt-version", "9.0"], tmp_path)
    root = etree.fromstring(text.encode())
    devices = root.findall("qemu:override/qemu:device", QEMU_NS)
    assert [d.get("alias") for d in devices] == ["ua-gpu", "ua-root", "ua-vmtrim-sdb"]
    root_props = devices[1].findall("qemu:frontend/qemu:property", QEMU_NS)
    assert [(p.get("name"), p.get("value")) for p in root_props] == [
        ("discard_granularity", "65536")
    ]
    assert settings(doc)[("sda", "qemu:override discard_granularity")] == "65536"
    assert ("sda", "alias") not in settings(doc)  # it has a user alias already
    # Nothing else moved: one declaration of the namespace, the GPU override untouched.
    assert text.count("xmlns:qemu=") == 1
    assert devices[0].find("qemu:frontend/qemu:property", QEMU_NS).get("name") == "x-vga"  # type: ignore[union-attr]


def test_qemu_args_json_device_gets_numbers(tmp_path: Path) -> None:
    doc, text = run_case("windows.args", DEVICE, tmp_path)
    device = next(w for w in text.split("'") if '"driver":"scsi-hd"' in w)
    spec = json.loads(device)
    assert (spec["discard_granularity"], spec["rotation_rate"]) == (65536, 1)
    assert (
        "virtio-blk-pci,bus=pci.4,addr=0x0,drive=drive-virtio-disk0,id=virtio-disk0,discard_granularity=65536"
        in text
    )
    warnings = doc["warnings"]
    assert isinstance(warnings, list)
    assert any("-drive if=ide has no -device" in w for w in warnings)


def fix_auto(tmp_path: Path, cluster: str, device: str) -> dict[str, object]:
    """`fix --discard-granularity auto` on a scsi-hd over a fresh qcow2 of that cluster."""
    image = tmp_path / f"c{cluster}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(image),
         "64M"], check=True,
    )  # fmt: skip
    args = tmp_path / "qemu.args"
    args.write_text(
        f"qemu-system-x86_64 -machine pc-q35-7.2 -device virtio-scsi-pci,id=scsi0"
        f" -drive file={image},format=qcow2,if=none,id=d0,discard=unmap -device {device}\n"
    )
    done = vmtrim("fix", "--no-probe", "--json", "--discard-granularity", "auto", "--qemu-args",
                  str(args))  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def test_auto_is_the_qcow2_cluster(tmp_path: Path) -> None:
    doc = fix_auto(tmp_path, "2M", "scsi-hd,bus=scsi0.0,drive=d0")
    assert settings(doc)[("d0", "device discard_granularity")] == "2097152"
    assert "scsi-hd,bus=scsi0.0,drive=d0,discard_granularity=2097152" in str(doc["text"])
    # A 64 KiB cluster under a device already at 64 KiB: nothing to change.
    doc = fix_auto(tmp_path, "64K", "scsi-hd,bus=scsi0.0,drive=d0,discard_granularity=65536")
    assert doc["changes"] == []


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("64K", 65536), ("64KiB", 65536), ("64k", 65536), ("1M", 1 << 20),
     ("1MiB", 1 << 20), ("512", 512), ("2G", 1 << 31), (" auto ", "auto"), ("AUTO", "auto")],
)  # fmt: skip
def test_sizes(text: str, value: int | str) -> None:
    assert parse_granularity(text) == value


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("3000", "3000 bytes is not a power of two"),
        ("96K", "96K = 98304 bytes is not a power of two"),
        ("256", "smaller than the 512-byte logical block"),
        ("4G", "larger than 2G"),
        ("64X", "'64X' is not a size"),
        ("-4096", "'-4096' is not a size"),
        ("", "'' is not a size"),
    ],
)
def test_bad_sizes_are_one_line_and_exit_2(bad: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=says):
        parse_granularity(bad)
    args = tmp_path / "qemu.args"
    args.write_text("qemu-system-x86_64 -drive file=/nonexistent.raw,format=raw\n")
    done = vmtrim("fix", "--qemu-args", str(args), "--discard-granularity", bad)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("vmtrim: --discard-granularity: ") and says in done.stderr


def test_xml_needs_a_libvirt_version_from_another_host(tmp_path: Path) -> None:
    source = tmp_path / "windows.xml"
    source.write_text(materialize("granularity/windows.xml", tmp_path))
    done = vmtrim("fix", "--no-probe", "--xml", str(source), *DEVICE)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "give --libvirt-version X.Y" in done.stderr
    bad = vmtrim("fix", "--xml", str(source), *DEVICE, "--libvirt-version", "ten")
    assert bad.returncode == 2 and "'ten' is not a version" in bad.stderr
    args = tmp_path / "qemu.args"
    args.write_text("qemu-system-x86_64\n")
    usage = vmtrim("fix", "--qemu-args", str(args), *DEVICE, "--libvirt-version", "9.0")
    assert usage.returncode == 2 and "--libvirt-version applies to --xml FILE only" in usage.stderr


def test_xml_defaults_to_this_hosts_libvirt(tmp_path: Path) -> None:
    """libvirt 9.0 here: without --libvirt-version the route is <qemu:override>."""
    source = tmp_path / "windows.xml"
    source.write_text(materialize("granularity/windows.xml", tmp_path))
    done = vmtrim("fix", "--json", "--xml", str(source), *DEVICE, "--dry-run")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert ("sda", "qemu:override discard_granularity") in settings(doc)


@pytest.mark.parametrize("variant", ["libvirt-9.0", "libvirt-8.0", "libvirt-7.0"])
def test_libvirt_schema_accepts_the_qemu_namespace_output(variant: str, tmp_path: Path) -> None:
    """libvirt 9.0's own schema (virt-xml-validate) takes <qemu:override>, <qemu:commandline>
    and the ua- aliases (it predates <blockio discard_granularity>, so not the 10.0 output)."""
    text = (GOLDEN / f"windows.xml.{variant}.out").read_text().replace("@DIR@", str(tmp_path))
    path = tmp_path / "fixed.xml"
    path.write_text(text)
    done = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_granularity_below_the_logical_block_is_not_set(tmp_path: Path) -> None:
    """A 4 KiB-sector disk (<blockio logical_block_size='4096'/>, or the -device property):
    QEMU refuses a discard_granularity that is not a multiple of it."""
    source = tmp_path / "4k.xml"
    source.write_text(
        materialize("granularity/windows.xml", tmp_path).replace(
            "<target dev='sda' bus='scsi'/>",
            "<blockio logical_block_size='4096' physical_block_size='4096'/>\n"
            "      <target dev='sda' bus='scsi'/>",
        )
    )
    done = vmtrim("fix", "--no-probe", "--json", "--xml", str(source), "--discard-granularity",
                  "2K", "--libvirt-version", "10.0", "--dry-run")  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert ("sda", "blockio discard_granularity") not in settings(doc)
    assert settings(doc)[("vda", "blockio discard_granularity")] == "2048"
    assert any(
        w.startswith("sda: discard_granularity not set: 2048 is not a multiple of its"
                     " logical_block_size 4096") for w in doc["warnings"]
    )  # fmt: skip
    args = tmp_path / "qemu.args"
    args.write_text(
        "qemu-system-x86_64 -device virtio-scsi-pci,id=scsi0"
        f" -drive file={tmp_path}/data.raw,format=raw,if=none,id=d0,discard=unmap"
        " -device scsi-hd,bus=scsi0.0,drive=d0,logical_block_size=4096\n"
    )
    done = vmtrim("fix", "--no-probe", "--json", "--qemu-args", str(args),
                  "--discard-granularity", "2K")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changes"] == []
