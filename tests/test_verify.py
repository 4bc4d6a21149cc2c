"""`vmtrim verify` on real guests under TCG: the lab kernel, real QEMU, real qemu-ga.

Every test runs the real command (or the real library on a real guest) and checks what
a user would check: exit codes, the one-line errors, and host-side bytes. Each test
gets its own TMPDIR, so it can prove that no QEMU of its own is left running and that
no temporary image is left behind, even while other suites run QEMU on this host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import vmtrim
from vmtrim.errors import GuestFailed
from vmtrim.lab import Appliance, ensure_appliance
from vmtrim.vm.guest import BUSES, GuestSpec, parse_status

MiB = 1 << 20
pytestmark = pytest.mark.vm


def qemu_processes_under(path: Path) -> list[int]:
    """PIDs of running QEMU processes whose command line mentions ``path``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"qemu-system-x86_64")
            and str(path).encode() in b" ".join(argv)
        ):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def tmpdir_env(appliance: Appliance) -> Iterator[tuple[Path, dict[str, str]]]:
    """A TMPDIR for one test (traversable, so libvirt's QEMU user can reach its files).

    After the test: no QEMU started under it still runs and no work directory is left.
    """
    tmp = Path(tempfile.mkdtemp(prefix="vmtrim-test-", dir="/tmp"))
    tmp.chmod(0o711)
    env = {**os.environ, "TMPDIR": str(tmp), "NO_COLOR": "1"}
    try:
        yield tmp, env
        deadline = time.monotonic() + 10
        while qemu_processes_under(tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert qemu_processes_under(tmp) == [], "a QEMU started by the test is still running"
        assert sorted(p.name for p in tmp.iterdir()) == [], "temporary files were left behind"
    finally:
        for pid in qemu_processes_under(tmp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def verify_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    done = vmtrim("verify", "--accel", "tcg", "--json", *args, env=env)
    doc = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, doc, done.stderr


def passing_cell(env: dict[str, str], *args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one cell that must match its expectation; (the cell, the whole document)."""
    code, doc, err = verify_json(env, *args)
    assert code == 0, err
    assert doc["schema"] == "vmtrim.verify/1"
    assert len(doc["cells"]) == 1
    cell: dict[str, Any] = doc["cells"][0]
    return cell, doc


def assert_reclaimed(cell: dict[str, Any], size_mib: int) -> None:
    assert cell["written_bytes"] == size_mib * MiB
    # The host image really grew by the data, then really shrank by it.
    assert cell["allocated_before"] >= cell["written_bytes"]
    assert cell["reclaimed_bytes"] == cell["allocated_before"] - cell["allocated_after"]
    assert cell["reclaimed_bytes"] >= 0.99 * cell["written_bytes"]
    assert cell["reclaim_ratio"] == pytest.approx(
        cell["reclaimed_bytes"] / cell["written_bytes"], abs=1e-4
    )
    assert (cell["expected"], cell["ok"]) == ("reclaim", True)


def test_direct_cell_reclaims_and_draws_png(
    tmpdir_env: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    _, env = tmpdir_env
    png = tmp_path / "cell.png"
    cell, doc = passing_cell(env, "--size", "32", "--png", str(png))
    assert (cell["bus"], cell["format"], cell["mode"], cell["discard"]) == (
        "virtio-scsi",
        "qcow2",
        "online",
        "unmap",
    )
    assert_reclaimed(cell, 32)
    # qcow2 clusters tell the same story as du
    assert cell["clusters_before"] - cell["clusters_after"] >= 0.99 * cell["written_bytes"]
    host = doc["host"]
    assert host["machine"].startswith("pc-i440fx-")  # the "pc" alias, resolved by QEMU
    assert host["guest_kernel"] == ensure_appliance().kernel_version
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_discard_ignore_does_not_reclaim(tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    _, env = tmpdir_env
    cell, _ = passing_cell(
        env, "--size", "32", "--discard", "ignore", "--format", "raw", "--bus", "virtio-blk"
    )
    assert cell["written_bytes"] == 32 * MiB
    assert cell["allocated_after"] >= cell["written_bytes"]  # the deleted data stays on the host
    assert cell["reclaimed_bytes"] <= 0.01 * cell["written_bytes"]
    assert cell["guest_discarded_bytes"] > 0  # the guest did send discards; QEMU dropped them
    assert (cell["expected"], cell["measured"], cell["ok"]) == ("none", "none", True)


def test_agent_mode_on_sata(tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    _, env = tmpdir_env
    cell, _ = passing_cell(env, "--size", "32", "--mode", "agent", "--bus", "sata")
    assert_reclaimed(cell, 32)
    assert cell["trimmed_reported"] >= cell["written_bytes"]  # guest-fstrim's per-path result
    assert cell["trim_error"] is None


def test_fstrim_on_ide_raw(tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    _, env = tmpdir_env
    cell, _ = passing_cell(
        env, "--size", "16", "--mode", "fstrim", "--bus", "ide", "--format", "raw"
    )
    assert_reclaimed(cell, 16)
    assert cell["trimmed_reported"] >= cell["written_bytes"]


def test_virtio_blk_on_machine_3_1_does_not_reclaim(
    tmpdir_env: tuple[Path, dict[str, str]],
) -> None:
    _, env = tmpdir_env
    cell, doc = passing_cell(
        env, "--size", "16", "--mode", "fstrim", "--bus", "virtio-blk", "--machine", "pc-i440fx-3.1"
    )
    assert doc["host"]["machine"] == "pc-i440fx-3.1"
    assert cell["reclaimed_bytes"] <= 0.01 * cell["written_bytes"]
    assert (cell["expected"], cell["measured"], cell["ok"]) == ("none", "none", True)
    assert "3.1" in cell["expected_because"]
    assert cell["trim_error"]  # the guest's fstrim fails: the device has no discard at all


def test_matrix_slice_runs_in_parallel_and_prints_the_table(
    tmpdir_env: tuple[Path, dict[str, str]],
) -> None:
    _, env = tmpdir_env
    # --bus and --format pin those dimensions: 3 modes x 2 discard settings remain
    code, doc, err = verify_json(
        env, "--matrix", "--bus", "virtio-blk", "--format", "raw", "--size", "8"
    )
    assert code == 0, err
    cells = doc["cells"]
    assert [(c["mode"], c["discard"]) for c in cells] == [
        (m, d) for m in ("online", "fstrim", "agent") for d in ("unmap", "ignore")
    ]
    for c in cells:
        assert c["ok"] and c["measured"] == c["expected"]
        assert (c["reclaimed_bytes"] >= 0.99 * c["written_bytes"]) == (c["discard"] == "unmap")
    table = vmtrim(
        "verify",
        "--accel",
        "tcg",
        "--matrix",
        "--bus",
        "virtio-blk",
        "--format",
        "raw",
        "--mode",
        "fstrim",
        "--size",
        "8",
        env=env,
    )
    assert table.returncode == 0, table.stderr
    rows = [ln for ln in table.stdout.splitlines() if "virtio-blk" in ln]
    assert len(rows) == 2 and all("fstrim" in r and "yes" in r for r in rows)


@pytest.mark.libvirt
def test_libvirt_cell_reclaims(libvirtd: str, tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    tmp, env = tmpdir_env
    cell, doc = passing_cell(env, "--size", "32", "--connect", libvirtd)
    assert cell["runner"] == "libvirt" and doc["host"]["runner"] == "libvirt"
    assert_reclaimed(cell, 32)
    # The transient domain is gone: no domain still points into this test's TMPDIR.
    listed = subprocess.run(
        ["virsh", "-c", libvirtd, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for name in listed.split():
        xml = subprocess.run(
            ["virsh", "-c", libvirtd, "dumpxml", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        assert str(tmp) not in xml, name


def test_boot_timeout_is_exit_3_with_serial_tail(tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    _, env = tmpdir_env
    # --quiet drops verify's step lines, so stderr is the error line alone.
    done = vmtrim(
        "--quiet", "verify", "--accel", "tcg", "--size", "8", "--boot-timeout", "1", env=env
    )
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("vmtrim: virtio-scsi/qcow2/online/unmap: ")
    assert "did not report 'ready'" in lines[0] and "serial log:" in lines[0]
    assert "Traceback" not in done.stderr


def test_panicking_guest_fails_with_the_panic_in_the_error(
    appliance: Appliance, tmpdir_env: tuple[Path, dict[str, str]]
) -> None:
    from vmtrim.vm.guest import DirectGuest

    tmp, _ = tmpdir_env
    work = Path(tempfile.mkdtemp(dir=tmp))
    spec = GuestSpec(appliance, scenario={"mode": "online"}, extra_cmdline=("rdinit=/missing",))
    try:
        with pytest.raises(GuestFailed) as failed, DirectGuest(spec, work, subject="panic") as g:
            g.ctl.expect("ready", 60)
    finally:
        shutil.rmtree(work)
    message = failed.value.one_line()
    assert message.startswith("panic: ")
    assert "Kernel panic" in message and "\n" not in message


def test_sigterm_stops_the_guest_and_removes_the_image(
    tmpdir_env: tuple[Path, dict[str, str]],
) -> None:
    tmp, env = tmpdir_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "verify", "--accel", "tcg", "--size", "64"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not qemu_processes_under(tmp):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "vmtrim: interrupted"
    # tmpdir_env then checks that no QEMU and no image is left


def test_bad_option_is_exit_2(tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    _, env = tmpdir_env
    done = vmtrim("verify", "--bus", "floppy", env=env)
    assert done.returncode == 2
    assert "floppy" in done.stderr and "Traceback" not in done.stderr


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_status_parser_never_raises(line: str) -> None:
    fields = parse_status(line)
    assert fields is None or "step" in fields


@settings(max_examples=60, deadline=None)
@given(
    step=st.from_regex(r"[a-z]{1,10}", fullmatch=True),
    pairs=st.dictionaries(
        st.from_regex(r"[a-z_]{1,8}", fullmatch=True).filter(
            lambda k: k not in ("step", "message")
        ),
        st.from_regex(r"[A-Za-z0-9./_-]{0,20}", fullmatch=True),
        max_size=5,
    ),
    message=st.none()
    | st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
)
def test_status_parser_round_trip(step: str, pairs: dict[str, str], message: str | None) -> None:
    line = "VMTRIM " + " ".join([f"step={step}", *(f"{k}={v}" for k, v in pairs.items())])
    if message is not None:
        line += f" message={message}"
    fields = parse_status(line)
    assert fields is not None
    assert fields["step"] == step
    for k, v in pairs.items():
        assert fields[k] == v
    if message is not None:
        assert fields["message"] == message.strip()


@pytest.mark.parametrize("bus", BUSES)
def test_domain_xml_is_valid_for_libvirt(appliance: Appliance, tmp_path: Path, bus: str) -> None:
    from vmtrim.vm.guest import DiskSpec, RunPaths
    from vmtrim.vm.libvirt import lab_domain_xml

    spec = GuestSpec(
        appliance,
        scenario={"mode": "agent"},
        agent=True,
        disk=DiskSpec(tmp_path / "d.qcow2", "qcow2", bus, "unmap"),
    )
    xml = tmp_path / "domain.xml"
    xml.write_text(
        lab_domain_xml(spec, "vmtrim-lab-x", RunPaths(tmp_path), appliance.kernel, appliance.initrd)
    )
    done = subprocess.run(
        ["virt-xml-validate", str(xml), "domain"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    from lxml import etree

    tree = etree.parse(str(xml))
    assert tree.xpath("string(devices/disk/driver/@discard)") == "unmap"
    assert tree.xpath("string(os/kernel)") == str(appliance.kernel)
