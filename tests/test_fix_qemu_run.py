"""The fixed command line on the real QEMU: it starts, QMP shows each disk on the device the
fix chose, and a discard through the block layer really punches the image (and did not
before the fix).

QMP on QEMU 7.2 does not show a node's discard setting: `query-block`,
`query-named-block-nodes` and `x-debug-query-block-graph` list the driver, cache mode
and detect_zeroes, but not discard. So discard is proven by its effect: the HMP
`qemu-io` command writes 1 MiB through the disk's BlockBackend and discards it, and
the image file's allocation (st_blocks) falls only when discard=unmap holds on every
node down to the file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fix_support import AUDIT_DATA, materialize
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.channels.qmp import SyncMonitor
from vmtrim.errors import EnvironmentProblem
from vmtrim.fix.policy import FixOptions
from vmtrim.fix.qemu import fix_qemu_args
from vmtrim.image.allocation import allocated_bytes
from vmtrim.model import DeviceType
from vmtrim.sources.qemu_args import parse_qemu_command, tokenize

pytestmark = pytest.mark.slow


def qemu_argv(fixed_text: str) -> list[str]:
    """The option part of a command line (no environment, no program, no KVM)."""
    argv = tokenize(fixed_text)
    start = next(i for i, token in enumerate(argv) if "qemu-system" in token) + 1
    return [a for a in argv[start:] if a not in ("--enable-kvm", "-enable-kvm")]


def start(argv: list[str], directory: Path) -> Iterator[SyncMonitor]:
    sock = directory / "qmp.sock"
    log = directory / "qemu.log"
    command = [
        "qemu-system-x86_64", *argv, "-S", "-display", "none", "-accel", "tcg",
        "-qmp", f"unix:{sock},server=on,wait=off", "-monitor", "none", "-serial", "none",
    ]  # fmt: skip
    with log.open("wb") as log_file:
        # stderr is where QEMU reports errors; HMP qemu-io prints its progress on stdout.
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        with contextlib.ExitStack() as stack:
            try:
                qmp = stack.enter_context(SyncMonitor(str(sock), timeout=20))
            except EnvironmentProblem:
                proc.wait(timeout=10)
                raise AssertionError(f"QEMU did not start: {log.read_text()}") from None
            yield qmp
        # QEMU reported no error. (A warning about probing the format of an image given
        # without format=, like legacy-mixed's -hdb, belongs to the input, not the fix.)
        errors = [line for line in log.read_text().splitlines()
                  if line.startswith("qemu-system") and "warning" not in line.lower()]  # fmt: skip
        assert errors == [], log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def query_list(qmp: SyncMonitor, command: str, args: dict[str, Any] | None = None) -> list[Any]:
    """The answer of a QMP query that returns a list (query-block, query-named-block-nodes)."""
    answer = qmp.execute(command, args)
    assert isinstance(answer, list), answer
    return answer


def devices(qmp: SyncMonitor) -> dict[str, str]:
    """image file name -> QOM type of the device it is inserted in."""
    found = {}
    for entry in query_list(qmp, "query-block"):
        inserted = entry.get("inserted")
        if not inserted or not entry.get("qdev"):
            continue
        kind = qmp.execute("qom-get", {"path": entry["qdev"], "property": "type"})
        assert isinstance(kind, str), kind
        found[Path(inserted["image"]["filename"]).name] = kind
    return found


def hmp(qmp: SyncMonitor, command_line: str) -> None:
    qmp.execute("human-monitor-command", {"command-line": command_line})


def discard_reclaims(qmp: SyncMonitor, qdev: str, image: Path) -> tuple[int, int]:
    """Write 1 MiB through the device's BlockBackend, then discard it: (after write, after)."""
    hmp(qmp, f'qemu-io -d {qdev} "write 0 1M"')
    hmp(qmp, f'qemu-io -d {qdev} "flush"')
    written = allocated_bytes(image)
    hmp(qmp, f'qemu-io -d {qdev} "discard 0 1M"')
    hmp(qmp, f'qemu-io -d {qdev} "flush"')
    return written, allocated_bytes(image)


def expected_devices(fixed_text: str, directory: Path) -> dict[str, str]:
    """What the fix chose, read back from the fixed command line by vmtrim's own parser."""
    domain = parse_qemu_command(fixed_text)
    qom = {"virtio-blk-pci": "virtio-blk-device"}  # query-block names the virtio backend
    return {
        Path(disk.source).name: qom.get(disk.qemu_device or "", disk.qemu_device or "")
        for disk in domain.disks
        if disk.source and disk.device is DeviceType.DISK and str(directory) in disk.source
    }


def design(name: str, directory: Path) -> str:
    """A DESIGN one-liner with its images moved into ``directory`` (and created)."""
    text = (AUDIT_DATA / name).read_text().replace("/data/hotplug", str(directory))
    for image in ("hotplug.qcow2", "vdb.qcow2"):
        if not (directory / image).exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(directory / image),
                            "64M"], check=True)  # fmt: skip
    return text


RUNS = [
    ("design-legacy.args", FixOptions(modernize=True, bus="scsi")),
    ("design-legacy.args", FixOptions(modernize=True)),
    ("design-current.args", FixOptions()),
    ("libvirt-blockdev.args", FixOptions(bus="scsi")),
    ("keyval-blockdev.args", FixOptions(detect_zeroes="unmap")),
    ("legacy-mixed.args", FixOptions(modernize=True, bus="scsi")),
]


@pytest.mark.parametrize(("name", "options"), RUNS, ids=[f"{n}-{i}" for i, (n, _) in
                                                          enumerate(RUNS)])  # fmt: skip
def test_fixed_command_line_runs_with_the_chosen_devices(
    tmp_path: Path, name: str, options: FixOptions
) -> None:
    text = design(name, tmp_path) if name.startswith("design") else materialize(name, tmp_path)
    result = fix_qemu_args(text, options, probes=HostProbes())
    want = expected_devices(result.new_text, tmp_path)
    assert want
    for qmp in start(qemu_argv(result.new_text), tmp_path):
        got = devices(qmp)
        assert {k: got.get(k) for k in want} == want
        if options.detect_zeroes:
            nodes = query_list(qmp, "query-named-block-nodes", {"flat": True})
            tops = [n for n in nodes if n["drv"] in ("qcow2", "raw") and n["node-name"] in
                    ("top", "rawtop")]  # fmt: skip
            assert {n["detect_zeroes"] for n in tops} == {"unmap"}
        for entry in query_list(qmp, "query-block"):
            inserted = entry.get("inserted")
            if not inserted or Path(inserted["image"]["filename"]).name not in want:
                continue
            image = Path(inserted["image"]["filename"])
            written, after = discard_reclaims(qmp, entry["qdev"], image)
            assert written - after >= 512 * 1024, (image, written, after)


def test_discard_is_dropped_before_the_fix(tmp_path: Path) -> None:
    """The same disk, unfixed: QEMU keeps the space. This is what the fix changes."""
    text = materialize("libvirt-blockdev.args", tmp_path)
    image = tmp_path / "one.qcow2"
    for qmp in start(qemu_argv(text), tmp_path):
        entry = next(e for e in query_list(qmp, "query-block") if e.get("inserted") and
                     Path(e["inserted"]["image"]["filename"]) == image)  # fmt: skip
        written, after = discard_reclaims(qmp, entry["qdev"], image)
        assert after == written  # discard ignored on the format node: nothing punched
    fixed = fix_qemu_args(text, FixOptions(), probes=HostProbes()).new_text
    image.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    for qmp in start(qemu_argv(fixed), tmp_path):
        entry = next(e for e in query_list(qmp, "query-block") if e.get("inserted") and
                     Path(e["inserted"]["image"]["filename"]) == image)  # fmt: skip
        written, after = discard_reclaims(qmp, entry["qdev"], image)
        assert written - after >= 512 * 1024
