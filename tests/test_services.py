"""The test session's libvirtd is real: it answers and runs the QEMU driver."""

from __future__ import annotations

import subprocess


def test_libvirtd_answers_with_qemu_driver(libvirtd: str) -> None:
    out = subprocess.run(
        ["virsh", "-c", libvirtd, "version"], capture_output=True, text=True, check=True
    ).stdout
    assert "QEMU" in out
    caps = subprocess.run(
        ["virsh", "-c", libvirtd, "domcapabilities", "--virttype", "qemu"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "<domainCapabilities>" in caps
