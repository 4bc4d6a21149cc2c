"""Windows guests through the real trim engine and CLI: no byte counts is not 0.

No Windows guest can be booted here, so the guest agent is a fake unix socket (plumbing
that plays back bytes) answering exactly as qga/qapi-schema.json documents for Windows:
``guest-get-osinfo`` with ``"id": "mswindows"``, and ``guest-fstrim`` paths that carry
only ``path`` (and ``error`` for a failed volume) — GuestFilesystemTrimResult's
``trimmed`` and ``minimum`` are optional, and qga/commands-win32.c sets neither. What is
real: the QEMU image on this host, whose bytes the agent's "retrim" frees with qemu-io
(as a Windows retrim through QEMU would), du before and after, and vmtrim's CLI.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import du_bytes, vmtrim
from test_channels_replies import fake, reply
from vmtrim.channels.qmp import FstrimPath
from vmtrim.facts import WINDOWS_TRIM_TIMEOUT
from vmtrim.trim.engine import DiskResult, TrimResult, shortfall

MiB = 1 << 20
OSINFO = {  # qga/qapi-schema.json GuestOSInfo, as commands-win32.c fills it
    "id": "mswindows",
    "name": "Microsoft Windows",
    "pretty-name": "Windows Server 2022 Datacenter",
    "version": "Microsoft Windows Server 2022",
    "version-id": "2022",
    "variant": "server",
    "variant-id": "server",
    "kernel-release": "20348",
    "kernel-version": "10.0",
    "machine": "x86_64",
}
GREETING = json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n"


def windows_hello(message: dict[str, Any]) -> bytes | None:
    """A Windows qemu-ga's answer to guest-sync and guest-get-osinfo; None to the rest."""
    command = message.get("execute")
    if command == "guest-sync":
        return reply(message, json.dumps(message["arguments"]["id"]).encode())
    if command == "guest-get-osinfo":
        return reply(message, json.dumps(OSINFO).encode())
    return None


def windows_agent(image: Path) -> Callable[[dict[str, Any]], bytes | None]:
    def handle(message: dict[str, Any]) -> bytes | None:
        if (hello := windows_hello(message)) is not None:
            return hello
        command = message.get("execute")
        if command == "guest-fstrim":
            # the retrim: QEMU gets the volume's discards and punches the image
            subprocess.run(
                ["qemu-io", "-c", "discard 0 16M", str(image)], check=True, capture_output=True
            )
            paths = [{"path": "C:\\"}, {"path": "E:\\", "error": "defrag.exe: 0x8900002A"}]
            return reply(message, json.dumps({"paths": paths}).encode())
        return b'{"error": {"class": "CommandNotFound", "desc": "no"}, "id": %s}\n' % (
            json.dumps(message.get("id")).encode()
        )

    return handle


def monitor(image: Path) -> Callable[[dict[str, Any]], bytes | None]:
    answers: dict[str, Any] = {
        "qmp_capabilities": {},
        "query-name": {"name": "win2022"},
        "query-block": [
            {
                "device": "",
                "qdev": "scsi0-0-0-0",
                "inserted": {"file": str(image), "node-name": "libvirt-1-format", "ro": False},
            }
        ],
        "query-blockstats": [{"device": "", "qdev": "scsi0-0-0-0", "stats": {}}],
    }

    def handle(message: dict[str, Any]) -> bytes | None:
        return reply(message, json.dumps(answers.get(str(message.get("execute")), {})).encode())

    return handle


def test_windows_trim_shows_the_host_figure_and_no_guest_zero(tmp_path: Path) -> None:
    image = tmp_path / "win.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write 0 16M", str(image)], check=True, capture_output=True)
    before = du_bytes(image)
    with fake(windows_agent(image)) as qga, fake(monitor(image), greeting=GREETING) as qmp:
        result = vmtrim(
            "trim", "--qga", str(qga.path), "--qmp", str(qmp.path), "--json", "--explain",
            "--no-history",
        )  # fmt: skip
        after = du_bytes(image)
        text = vmtrim("trim", "--qga", str(qga.path), "--qmp", str(qmp.path), "--no-history")
    assert result.returncode == 0, result.stderr
    [dom] = json.loads(result.stdout)["domains"]
    assert dom["os_id"] == "mswindows"
    # no byte count is not 0: null, and the note says what counts instead
    assert dom["guest_trimmed_bytes"] is None
    assert [p["trimmed"] for p in dom["paths"]] == [None, None]
    assert dom["note"] == "Windows reports no byte counts; the host figure is the measurement"
    [disk] = dom["disks"]
    assert (disk["allocated_before"], disk["allocated_after"]) == (before, after)
    assert disk["reclaimed_bytes"] == before - after >= 15 * MiB  # what the host got back
    # --explain compares nothing with a guest figure that does not exist
    assert dom["explained"] is True and dom["causes"] == []
    assert "no guest figure to compare" in dom["explain_note"]
    assert text.returncode == 0, text.stderr
    assert "Windows reports no byte counts; the host figure is the measurement" in text.stdout
    row = next(line for line in text.stdout.splitlines() if line.startswith("win2022"))
    assert row.split()[-2] == "-"  # the "guest says" column: no figure, not "0 B"


def test_windows_gets_the_longer_default_timeout() -> None:
    """The engine's deadline moves to timeout_windows once osinfo says mswindows: an agent
    that answers guest-fstrim only after the Linux timeout still trims."""
    import time

    from vmtrim.trim import QemuTarget, TrimOptions, trim_target

    def slow(message: dict[str, Any]) -> bytes | None:
        if (hello := windows_hello(message)) is not None:
            return hello
        time.sleep(2.5)  # longer than the Linux timeout below
        return reply(message, json.dumps({"paths": [{"path": "C:\\"}]}).encode())

    with fake(slow) as qga:
        options = TrimOptions(timeout=1.0, timeout_windows=30.0)
        result = trim_target(QemuTarget(str(qga.path), None), options)
        linux = trim_target(QemuTarget(str(qga.path), None), TrimOptions(timeout=1.0))
    assert (result.status, result.os_id, result.reason) == (
        "trimmed",
        "mswindows",
        "Windows reports no byte counts; the host figure is the measurement",
    )
    assert [p.path for p in result.paths] == ["C:\\"]
    assert linux.status == "skipped"  # no osinfo asked: the 1 s timeout stands
    assert WINDOWS_TRIM_TIMEOUT == 600.0  # the CLI default, FIELD.md [W6] (> 360 s)


def test_no_guest_figure_is_never_a_shortfall() -> None:
    disks = [DiskResult("sda", "/w.qcow2", 10 * MiB, 10 * MiB)]
    windows = TrimResult("w", paths=[FstrimPath("C:\\")], disks=disks, os_id="mswindows")
    assert not shortfall(windows)
    linux = TrimResult("l", paths=[FstrimPath("/", trimmed=500 * MiB)], disks=disks)
    assert shortfall(linux)
