"""QEMU command line -> model: tokens, option syntax, the argument zoo, a real QEMU process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.model import DeviceType, DiskReport, LayerKind, StorageKind, Verdict
from vmtrim.sources.qemu_args import parse_qemu_command, read_args_file, read_pid, tokenize
from vmtrim.sources.qemu_opts import (
    ARG_OPTIONS,
    FLAG_OPTIONS,
    parse_keyval,
    parse_opts,
    split_commas,
)

DATA = Path(__file__).parent / "data" / "audit"
OFFLINE = HostProbes(local=False)
QEMU = "qemu-system-x86_64"


# ---------------------------------------------------------------- tokens and option syntax


def test_backslash_newline_joins_even_inside_an_argument() -> None:
    text = (
        'LC_ALL=C PATH=/bin /usr/bin/qemu-system-x86_64 \\\n  -blockdev \'{"driver":"fi\\\n'
        'le","filename":"/a b"}\' \\\r\n  -m 1g\n'
    )
    assert tokenize(text) == [
        "LC_ALL=C",
        "PATH=/bin",
        "/usr/bin/qemu-system-x86_64",
        "-blockdev",
        '{"driver":"file","filename":"/a b"}',
        "-m",
        "1g",
    ]


def test_nul_separated_cmdline_is_taken_verbatim() -> None:
    raw = b"qemu-system-x86_64\0-drive\0file=/a b,if=virtio\0-m\0\0"
    assert tokenize(raw) == ["qemu-system-x86_64", "-drive", "file=/a b,if=virtio", "-m", ""]


def test_double_comma_escapes_a_comma() -> None:
    assert split_commas("file=/a,,b.img,,,if=none,") == ["file=/a,b.img,", "if=none"]
    opts = parse_opts("scsi-hd,drive=d0,removable", implied="driver")
    assert opts == {"driver": "scsi-hd", "drive": "d0", "removable": "on"}


def test_keyval_dotted_keys_nest() -> None:
    spec = parse_keyval(
        "driver=qcow2,file.driver=file,file.filename=/x,,y,node-name=n", "t", "-blockdev"
    )
    assert spec == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/x,y"},
        "node-name": "n",
    }
    with pytest.raises(BadInput, match="conflicts"):
        parse_keyval("file=a,file.driver=file", "t", "-blockdev")


def test_env_assignments_and_program_are_skipped() -> None:
    domain = parse_qemu_command("A=1 B='x y' /opt/qemu/bin/qemu-system-x86_64 -M pc-q35-4.2")
    assert domain.machine == "pc-q35-4.2"
    with pytest.raises(BadInput, match="not a QEMU command line"):
        parse_qemu_command("ls -l /")


def test_bare_argument_is_the_first_hard_disk() -> None:
    domain = parse_qemu_command("qemu-system-x86_64 disk.img -m 512")
    (disk,) = domain.disks
    assert (disk.ident, disk.bus, disk.qemu_device, disk.discard) == (
        "ide0-hd0",
        "ide",
        "ide-hd",
        None,
    )


# ---------------------------------------------------------------- the argument zoo


@pytest.fixture(scope="module")
def zoo() -> dict[str, DiskReport]:
    domain = read_args_file(str(DATA / "zoo.args"))
    assert (domain.name, domain.machine) == ("argzoo", "pc-q35-7.2")
    assert any("pflash" in note for note in domain.notes)
    return {r.disk.ident: r for r in audit_domain(domain, OFFLINE)}


def test_zoo_lists_every_guest_disk(zoo: dict[str, DiskReport]) -> None:
    assert sorted(zoo) == sorted(
        [
            "scsi0-0-0-0",
            "sas-disk",
            "virtio-c",
            "nvme-d",
            "usb-e",
            "rbd-disk",
            "nbd-disk",
            "cd0",
            "virtio-i",
            "virtio0",
            "scsi0-hd3",
            "floppy0",
            "ide2-cd0",  # -cdrom is index 2: on q35 one drive per AHCI port, as QEMU names it
        ]
    )


def test_zoo_json_blockdev_over_virtio_scsi(zoo: dict[str, DiskReport]) -> None:
    disk = zoo["scsi0-0-0-0"].disk
    assert (disk.bus, disk.controller_model, disk.format, disk.discard) == (
        "scsi",
        "virtio-scsi",
        "qcow2",
        "unmap",
    )
    assert disk.source == "/srv/vm/json-a.qcow2"
    assert zoo["scsi0-0-0-0"].config_verdict is Verdict.PASS


def test_zoo_keyval_blockdev_with_inline_file_inherits_discard(zoo: dict[str, DiskReport]) -> None:
    disk = zoo["sas-disk"].disk
    assert disk.source == "/srv/vm/key,value.qcow2"
    assert disk.controller_model == "lsisas1078"
    assert disk.node is not None and disk.node.file is not None
    assert disk.node.file.discard == "unmap" and disk.node.file.inherited
    assert zoo["sas-disk"].config_verdict is Verdict.PASS


def test_zoo_referenced_storage_node_without_discard_blocks(zoo: dict[str, DiskReport]) -> None:
    layer = zoo["virtio-c"].layer(LayerKind.BLOCK_NODE)
    assert layer.verdict is Verdict.BLOCK
    assert "c-storage" in layer.reason
    assert layer.fix == 'add "discard":"unmap" to -blockdev c-storage'


def test_zoo_global_turns_virtio_discard_off_unless_the_device_says_on(
    zoo: dict[str, DiskReport],
) -> None:
    assert zoo["virtio-c"].layer(LayerKind.DEVICE).verdict is Verdict.BLOCK
    assert zoo["virtio0"].layer(LayerKind.DEVICE).verdict is Verdict.BLOCK
    assert zoo["virtio-i"].layer(LayerKind.DEVICE).verdict is Verdict.PASS


def test_zoo_legacy_drives(zoo: dict[str, DiskReport]) -> None:
    assert zoo["virtio0"].disk.discard == "ignore"
    scsi = zoo["scsi0-hd3"].disk
    assert (scsi.qemu_device, scsi.controller_model, scsi.discard) == (
        "scsi-hd",
        "lsilogic",
        "unmap",
    )
    assert zoo["floppy0"].disk.device is DeviceType.FLOPPY and zoo["floppy0"].blocks
    cdrom = zoo["ide2-cd0"]
    assert (cdrom.disk.bus, cdrom.disk.qemu_device, cdrom.exempt) == ("sata", "ide-cd", "cdrom")
    assert zoo["cd0"].disk.empty and zoo["cd0"].exempt


def test_zoo_network_drives(zoo: dict[str, DiskReport]) -> None:
    rbd, nbd = zoo["rbd-disk"].disk, zoo["nbd-disk"].disk
    assert (rbd.storage, rbd.protocol) == (StorageKind.NETWORK, "rbd")
    assert (nbd.storage, nbd.protocol, nbd.source) == (
        StorageKind.NETWORK,
        "nbd",
        "nbd://nbd.example:10809/e0",
    )
    assert zoo["rbd-disk"].layer(LayerKind.HOST_STORAGE).verdict is Verdict.PASS
    assert zoo["nbd-disk"].layer(LayerKind.HOST_STORAGE).verdict is Verdict.UNKNOWN


def test_zoo_nvme_and_usb(zoo: dict[str, DiskReport]) -> None:
    assert zoo["nvme-d"].disk.bus == "nvme" and zoo["nvme-d"].disk.detect_zeroes == "unmap"
    assert zoo["nvme-d"].layer(LayerKind.DEVICE).verdict is Verdict.PASS
    assert zoo["usb-e"].layer(LayerKind.GUEST_DRIVER).verdict is Verdict.UNKNOWN


def test_zoo_as_nul_separated_cmdline(tmp_path: Path, zoo: dict[str, DiskReport]) -> None:
    argv = tokenize((DATA / "zoo.args").read_text())
    raw = tmp_path / "cmdline"
    raw.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    again = {r.disk.ident: r.verdict for r in audit_domain(read_args_file(str(raw)), OFFLINE)}
    assert again == {name: r.verdict for name, r in zoo.items()}


# ---------------------------------------------------------------- checked against real QEMU

# Lines whose layout in -help cannot tell a placeholder from a description.
HELP_LAYOUT_EXCEPTIONS = {
    "-usbdevice": True,
    "-kernel": True,
    "-append": True,
    "-qmp-pretty": True,
    "-option-rom": True,
}


def test_option_table_agrees_with_qemu_help() -> None:
    """Every option `qemu-system-x86_64 -help` lists is known, with the right arity."""
    text = subprocess.run([QEMU, "-help"], capture_output=True, text=True, check=True).stdout
    checked = 0
    for line in text.splitlines():
        match = re.match(r"^(-[\w-]+)(?:/(-[\w-]+))?(?:(\s+)(\S+)(\s*))?", line)
        if not match or " or -" in line:  # "-h or -help"
            continue
        word, after = match.group(4, 5)
        # A placeholder ("file", "[size=]megs") stands alone or has a column gap after it;
        # a description ("-S   freeze CPU at startup") goes on with single spaces.
        takes_arg = word is not None and (
            any(c in word for c in "[<=,:%") or len(after) >= 2 or after == ""
        )
        takes_arg = HELP_LAYOUT_EXCEPTIONS.get(match.group(1), takes_arg)
        for option in filter(None, match.group(1, 2)):
            name = option.lstrip("-")
            assert name in (ARG_OPTIONS if takes_arg else FLAG_OPTIONS), (option, line)
            checked += 1
    assert checked > 80


@pytest.fixture(scope="module")
def running_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    work = tmp_path_factory.mktemp("qemu-pid")
    image = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    proc = subprocess.Popen(
        [
            QEMU,
            "-machine",
            "pc-i440fx-3.1",
            "-accel",
            "tcg",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-blockdev",
            json.dumps(
                {"driver": "file", "filename": str(image), "node-name": "s0", "discard": "unmap"}
            ),
            "-blockdev",
            "driver=qcow2,node-name=f0,file=s0,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=f0,id=vd0",
            "-qmp",
            f"unix:{work / 'qmp.sock'},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_pid_of_a_running_qemu(running_qemu: subprocess.Popen[bytes]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmtrim", "audit", "--json", "--pid", str(running_qemu.pid)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    (disk,) = json.loads(result.stdout)["disks"]
    assert (disk["target"], disk["bus"], disk["format"], disk["discard"]) == (
        "vd0",
        "virtio",
        "qcow2",
        "unmap",
    )
    device = next(layer for layer in disk["layers"] if layer["layer"] == "device")
    assert device["verdict"] == "block" and "pc-i440fx-3.1" in device["reason"]
    # the image is real and local: its header was read, the host probed
    host = next(layer for layer in disk["layers"] if layer["layer"] == "host_storage")
    assert host["verdict"] == "pass"
    assert any("64 KiB" in f["message"] for f in disk["findings"])


def test_pid_knows_the_qemu_version(running_qemu: subprocess.Popen[bytes]) -> None:
    installed = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    domain = read_pid(running_qemu.pid)
    assert domain.qemu_version is not None
    assert installed.startswith("QEMU emulator version " + ".".join(map(str, domain.qemu_version)))


def test_real_qemu_turns_virtio_blk_discard_off_on_3_1_machines(tmp_path: Path) -> None:
    """The fact behind the machine-type rule, asked of the installed QEMU over QMP."""
    answers = {}
    for machine in ("pc-i440fx-3.1", "pc-q35-7.2"):
        commands = "\n".join(
            json.dumps(c)
            for c in [
                {"execute": "qmp_capabilities"},
                {
                    "execute": "qom-get",
                    "arguments": {"path": "/machine/peripheral/vd0", "property": "discard"},
                },
                {"execute": "quit"},
            ]
        )
        out = subprocess.run(
            [
                QEMU,
                "-machine",
                machine,
                "-accel",
                "tcg",
                "-S",
                "-display",
                "none",
                "-nodefaults",
                "-drive",
                "if=none,id=d0,driver=null-co",
                "-device",
                "virtio-blk-pci,drive=d0,id=vd0",
                "-qmp",
                "stdio",
            ],
            input=commands + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        replies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        answers[machine] = next(r["return"] for r in replies if isinstance(r.get("return"), bool))
    assert answers == {"pc-i440fx-3.1": False, "pc-q35-7.2": True}


# ---------------------------------------------------------------- fuzzing

_TOKENS = st.sampled_from(
    [
        "-drive",
        "-blockdev",
        "-device",
        "-machine",
        "-M",
        "-m",
        "-S",
        "-hda",
        "-cdrom",
        "-global",
        "file=/x,if=none,id=d0",
        "driver=file,filename=/y,node-name=n",
        '{"driver":"file"}',
        '{"driver":"qcow2","file":"n","node-name":"t"}',
        "scsi-hd,drive=d0",
        "scsi-hd,drive=n",
        '{"driver":"virtio-blk-pci","drive":"t"}',
        "virtio-scsi-pci,id=s",
        "pc-i440fx-3.1",
        ",,",
        "if=virtio,file=/z,discard=on",
        "virtio-blk-pci.discard=off",
        "file.driver=nbd",
        "{",
        "",
        "-enable-kvm",
        "--nographic",
        "x=1",
        "-nodefaults",
        "ide-cd",
        "nvme,drive=d0",
        "'",
        "\\\n",
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_TOKENS, max_size=12))
def test_fuzz_argv_only_raises_bad_input(tokens: list[str]) -> None:
    try:
        domain = parse_qemu_command(["qemu-system-x86_64", *tokens])
    except BadInput:
        return
    audit_domain(domain, OFFLINE, read_images=False)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_raw_bytes_only_raise_bad_input(data: bytes) -> None:
    try:
        domain = parse_qemu_command(b"qemu-system-x86_64 " + data)
    except BadInput:
        return
    audit_domain(domain, OFFLINE, read_images=False)


def test_unformatted_drive_is_probed_from_the_header(tmp_path: Path) -> None:
    image = tmp_path / "probe-me.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    domain = parse_qemu_command(
        [
            "qemu-system-x86_64",
            "-drive",
            f"file={image},if=none,id=d0,discard=unmap",
            "-device",
            "virtio-scsi-pci",
            "-device",
            "scsi-hd,drive=d0",
        ]
    )
    (report,) = audit_domain(domain, HostProbes())
    assert report.disk.format is None
    assert report.layer(LayerKind.BLOCK_NODE).verdict is Verdict.PASS  # qcow2 from the header
    assert any("header says qcow2" in f.message for f in report.findings)
    assert report.disk.controller_model == "virtio-scsi"


def test_host_device_from_dev_path() -> None:
    domain = parse_qemu_command("qemu-system-x86_64 -drive file=/dev/sdq,format=raw,if=virtio")
    (disk,) = domain.disks
    assert (disk.storage, disk.format, disk.source) == (StorageKind.BLOCK, "raw", "/dev/sdq")


@pytest.mark.parametrize("form", ["inline", "referenced", "dotted"])
def test_absurdly_deep_node_graphs_are_bad_input(form: str) -> None:
    depth = 400
    argv = ["qemu-system-x86_64"]
    if form == "inline":
        spec: dict[str, object] = {"driver": "file", "filename": "/x"}
        for _ in range(depth):
            spec = {"driver": "raw", "file": spec}
        argv += ["-blockdev", json.dumps({**spec, "node-name": "top"})]
    elif form == "referenced":
        argv += ["-blockdev", "driver=file,filename=/x,node-name=n0"]
        argv += [
            arg
            for i in range(1, depth)
            for arg in ("-blockdev", f"driver=raw,file=n{i - 1},node-name=n{i}")
        ]
        argv[-1] = argv[-1].replace(f"node-name=n{depth - 1}", "node-name=top")
    else:
        keys = ",".join("file." * k + "driver=raw" for k in range(1, depth))
        argv += ["-blockdev", f"driver=raw,node-name=top,{keys}"]
    argv += ["-device", "virtio-blk-pci,drive=top"]
    with pytest.raises(BadInput, match="nested more than"):
        parse_qemu_command(argv)


def test_wrappers_comments_and_shell_syntax() -> None:
    """Proxmox's `taskset --cpu-list --all-tasks 0-3 /usr/bin/kvm ...`, a trailing comment."""
    domain = parse_qemu_command(
        "taskset --cpu-list --all-tasks 0-3 /usr/bin/kvm -id 100 -M pc-q35-7.2 # pinned\n"
        "  -drive file=/i/a.raw,if=virtio,format=raw\n"
    )
    assert domain.machine == "pc-q35-7.2" and [d.ident for d in domain.disks] == ["virtio0"]
    for text in ("qemu-system-x86_64 -m 1g > log", "qemu-system-x86_64 -m $MEM", "qemu; rm x"):
        with pytest.raises(BadInput, match="cannot split the command line: shell"):
            parse_qemu_command(text)
    # A '#' or '$' inside a word, and anything quoted, is only text.
    domain = parse_qemu_command("qemu-system-x86_64 -name 'a;b|c' -append x#y$ -m 1")
    assert domain.name == "a;b|c"
