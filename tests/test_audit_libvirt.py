"""The real libvirtd renders each test XML as a QEMU command line; the audit agrees on both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_audit_pairs import NAMES, PAIRS, signature
from vmtrim.sources.libvirt_xml import parse_domain_file
from vmtrim.sources.qemu_args import parse_qemu_command, tokenize

pytestmark = pytest.mark.libvirt


def native_argv(uri: str, xml: Path) -> str:
    proc = subprocess.run(
        ["virsh", "-c", uri, "domxml-to-native", "qemu-argv", "--xml", str(xml)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name", NAMES)
def test_real_libvirt_command_line_gives_the_same_verdicts(libvirtd: str, name: str) -> None:
    xml = PAIRS / f"{name}.xml"
    generated = parse_qemu_command(native_argv(libvirtd, xml), subject=f"{name} (libvirt)")
    assert signature(generated) == signature(parse_domain_file(str(xml)))


def test_real_libvirt_puts_unmap_on_storage_nodes_only(libvirtd: str) -> None:
    """DESIGN.md's trap, seen on the real libvirt: the storage node always says unmap."""
    argv = tokenize(native_argv(libvirtd, PAIRS / "design-scsi.xml"))
    nodes = [json.loads(argv[i + 1]) for i, arg in enumerate(argv) if arg == "-blockdev"]
    by_name = {node["node-name"]: node for node in nodes}
    assert by_name["libvirt-1-storage"]["discard"] == "unmap"
    assert "discard" not in by_name["libvirt-1-format"]
    (disk,) = parse_qemu_command(argv).disks
    assert disk.discard is None  # the setting that counts is the format node's
