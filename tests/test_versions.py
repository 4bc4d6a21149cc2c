"""vmtrim._util.versions against the versions real tools print."""

from __future__ import annotations

import subprocess

import libvirt
import pytest

from vmtrim._util.versions import (
    format_version,
    from_libvirt,
    from_qemu_banner,
    from_qmp,
    installed_qemu_version,
    machine_version,
    parse_version,
)
from vmtrim.model import MachineType


@pytest.mark.parametrize(
    ("machine", "version"),
    [
        ("pc-i440fx-3.1", (3, 1)),
        ("pc-q35-7.2", (7, 2)),
        ("pc-q35-8.1+pve0", (8, 1)),  # Proxmox's revision suffix
        ("pc-i440fx-2.12", (2, 12)),
        ("pc", None),  # an alias: its version is the QEMU release's
        ("q35", None),
        ("pc-q35-rhel9.4.0", None),  # RHEL's own numbering is not upstream's
        ("pc-q35-jammy", None),  # Ubuntu's codenames carry no version
    ],
)
def test_machine_versions(machine: str, version: tuple[int, ...] | None) -> None:
    assert machine_version(machine) == version
    parsed = MachineType.parse(machine)
    assert parsed.version == version
    assert parsed.family == (machine.rsplit("-", 1)[0] if version else machine)


def test_the_installed_qemu_agrees_with_its_banner_and_qmp_shape() -> None:
    banner = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout
    version = installed_qemu_version()
    assert version is not None and version == from_qemu_banner(banner)
    assert banner.startswith(f"QEMU emulator version {format_version(version)}")
    major, minor, micro = version
    assert from_qmp({"qemu": {"major": major, "minor": minor, "micro": micro}}) == version


def test_libvirt_packed_versions_are_the_librarys() -> None:
    packed = libvirt.getVersion()
    assert (
        format_version(from_libvirt(packed))
        == subprocess.run(
            ["pkg-config", "--modversion", "libvirt"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )


@pytest.mark.parametrize(
    "reply",
    [None, [], {"qemu": None}, {"qemu": {"major": "7"}}, {"qemu": {"major": True, "minor": 1,
     "micro": 0}}, {"qemu": {"major": 10**9, "minor": 0, "micro": 0}}],
)  # fmt: skip
def test_hostile_query_version_is_unknown(reply: object) -> None:
    assert from_qmp(reply) is None


def test_dotted_text() -> None:
    assert parse_version("5.10.0-26-cloud-amd64") == (5, 10, 0)
    assert parse_version("v9.0.0") == (9, 0, 0)
    assert parse_version("unknown") is None and format_version(None) == "unknown"
