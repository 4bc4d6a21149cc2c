"""Versions as tuples of integers, read from every place vmtrim meets them.

One home for what used to be nine helpers in six modules: dotted text (``7.2.0``,
``5.10.0-26-cloud-amd64``), libvirt's packed integers (``9000000``), QMP's
``query-version``, machine types (``pc-i440fx-3.1``) and ``qemu-system-x86_64 --version``.
"""

from __future__ import annotations

import re
import subprocess

Version = tuple[int, ...]
"""A dotted version as integers: ``(7, 2)`` for QEMU 7.2, ``(5, 10, 0)`` for Linux 5.10.0."""

QEMU = "qemu-system-x86_64"
_LEADING = re.compile(r"\s*v?(\d+(?:\.\d+)*)")
# Proxmox appends its own revision (pc-q35-8.1+pve0, pve-qemu "Allow version code in
# machine type"); the upstream version in front of it is what the compat rules follow.
_MACHINE = re.compile(r"-(\d+\.\d+(?:\.\d+)?)(?:\+pve\d+)?$")
_QEMU_BANNER = re.compile(r"QEMU emulator version (\d+(?:\.\d+)*)")


def parse_version(text: str | None) -> Version | None:
    """``"7.2.0"`` -> ``(7, 2, 0)``; ``"5.10.0-26-cloud-amd64"`` -> ``(5, 10, 0)``.

    Takes the leading run of dotted integers; returns None when there is none.
    """
    if not text:
        return None
    match = _LEADING.match(text)
    if not match:
        return None
    return tuple(int(part) for part in match.group(1).split("."))


def format_version(version: Version | None) -> str:
    return ".".join(str(part) for part in version) if version else "unknown"


def from_libvirt(packed: int) -> Version:
    """libvirt's packed ``1000000*major + 1000*minor + micro`` -> ``(9, 0, 0)``."""
    return (packed // 1000000, packed // 1000 % 1000, packed % 1000)


def from_qmp(reply: object) -> Version | None:
    """QMP ``query-version``'s ``{"qemu": {"major": 7, "minor": 2, "micro": 0}}``."""
    qemu = reply.get("qemu") if isinstance(reply, dict) else None
    if not isinstance(qemu, dict):
        return None
    parts = [qemu.get(key) for key in ("major", "minor", "micro")]
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 10**6 for p in parts):
        return None
    return tuple(int(p) for p in parts)  # type: ignore[arg-type]


def machine_version(machine: str) -> Version | None:
    """The version of a versioned machine type (``pc-q35-7.2`` -> ``(7, 2)``); None for aliases."""
    match = _MACHINE.search(machine)
    return parse_version(match.group(1)) if match else None


def from_qemu_banner(text: str) -> Version | None:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> ``(7, 2, 22)``."""
    match = _QEMU_BANNER.search(text)
    return parse_version(match.group(1)) if match else None


def installed_qemu_version(timeout: float = 30.0) -> Version | None:
    """The version of the ``qemu-system-x86_64`` on PATH (the host's own, never a binary
    a user or another process pointed at), or None when it cannot run."""
    try:
        out = subprocess.run(
            [QEMU, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return from_qemu_banner(out)
