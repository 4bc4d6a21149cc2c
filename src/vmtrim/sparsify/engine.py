"""``vmtrim sparsify``: give a shut-off image's free space back, in place.

The image is attached to the lab appliance's ``sparsify`` variant (see
``vmtrim/lab/sparsify.sh``) read-write with ``discard=unmap`` on virtio-scsi, in its
own format; QEMU opens any backing file read-only, so only the top image changes.
The guest mounts each filesystem with safe options, fstrims it and unmounts it, and
discards swap behind its header. Before and after each one the host measures the
image's allocation (``du``), so the report says what each filesystem really gave
back; FITRIM's own figure is an upper bound.

Cache mode: QEMU's default for ``-blockdev`` (writeback, flushes honoured), not
``cache=unsafe``. A SIGKILL of QEMU is safe either way (the qcow2 driver issues its
metadata writes in dependency order, and what it wrote is in the host page cache),
but ``unsafe`` drops the flushes that order those writes on the disk, so a host
crash or power cut could then leave L2 tables pointing at freed clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmtrim.errors import BadInput, GuestFailed
from vmtrim.image.allocation import allocated_bytes
from vmtrim.sparsify.inuse import refuse_if_in_use
from vmtrim.vm.guest import (
    ControlChannel,
    DirectGuest,
    DiskSpec,
    GuestSpec,
    make_workdir,
    parse_status,
)

SCHEMA = "vmtrim.sparsify/1"
GAP_MIN = 1024 * 1024  # smaller gaps are alignment padding, not worth a line
STEP_TIMEOUT = 900.0  # one filesystem's fstrim under TCG


@dataclass
class Filesystem:
    device: str  # as the guest names it: vda2, vg/lv
    type: str
    size: int
    uuid: str | None = None
    label: str | None = None
    action: str = "trimmed"  # trimmed | failed | would trim | checked
    error: str | None = None
    fitrim_bytes: int | None = None  # what FITRIM said: an upper bound
    allocated_before: int | None = None
    allocated_after: int | None = None
    uuid_after: str | None = None

    @property
    def freed(self) -> int | None:
        if self.allocated_before is None or self.allocated_after is None:
            return None
        return self.allocated_before - self.allocated_after


@dataclass
class LeftAlone:
    device: str
    type: str
    size: int | None
    reason: str


@dataclass
class SparsifyResult:
    path: str
    format: str
    backing: str | None
    virtual_size: int | None
    dry_run: bool
    allocated_before: int
    allocated_after: int | None = None
    filesystems: list[Filesystem] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> path -> sha
    zeros_discarded: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("checksums")
        for fs, out in zip(self.filesystems, data["filesystems"], strict=True):
            out["freed"] = fs.freed
        data["freed"] = (
            None if self.allocated_after is None else self.allocated_before - self.allocated_after
        )
        return data


def _image_facts(path: Path) -> tuple[str, str | None, int | None]:
    from vmtrim._util.proc import run_tool

    out = run_tool(["qemu-img", "info", "-U", "--output=json", str(path)], subject=str(path))
    info = json.loads(out)
    fmt = str(info.get("format"))
    if fmt not in ("qcow2", "raw"):
        raise BadInput(f"sparsify handles qcow2 and raw images, not {fmt}", subject=str(path))
    if info.get("format-specific", {}).get("data", {}).get("corrupt"):
        raise BadInput(
            "the image is marked corrupt: run qemu-img check -r first", subject=str(path)
        )
    backing = info.get("backing-filename")
    return fmt, str(backing) if backing else None, info.get("virtual-size")


def _read_only(argv: list[str]) -> list[str]:
    """The lab's -blockdev arguments with read-only on: --dry-run and checksums write nothing."""
    out = []
    for arg in argv:
        if arg.startswith("{") and '"node-name":"disk0' in arg:
            node = json.loads(arg)
            node["read-only"] = True
            node.pop("discard", None)
            arg = json.dumps(node, separators=(",", ":"))
        out.append(arg)
    return out


def _die_with_us(argv: list[str]) -> list[str]:
    """QEMU under ``setpriv --pdeathsig KILL``: if vmtrim is killed, so is its QEMU.

    Otherwise a SIGKILLed vmtrim would leave the appliance blocked on a control port
    nobody reads, holding the image's lock. A killed QEMU leaves a qcow2 consistent
    (leaked clusters at most): what it wrote is in the host's page cache, in order.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def _next_status(ctl: ControlChannel, timeout: float) -> dict[str, str]:
    # ControlChannel.expect waits for one named step; here every step matters, in order.
    deadline = time.monotonic() + timeout
    while True:
        fields = parse_status(ctl._readline(deadline, "the next step"))
        if fields is not None:
            return fields


def _gaps(parts: list[tuple[int, int]], disk_size: int) -> list[tuple[int, int]]:
    """(start, length) of the unpartitioned space between and after partitions."""
    gaps = []
    pos = GAP_MIN  # the first MiB holds the partition table and alignment padding
    for start, size in sorted(parts):
        if start - pos >= GAP_MIN:
            gaps.append((pos, start - pos))
        pos = max(pos, start + size)
    if parts and disk_size - GAP_MIN - pos >= GAP_MIN:  # GPT keeps a backup at the end
        gaps.append((pos, disk_size - pos))
    return gaps


def _pause(point: str) -> None:
    """A test hook: VMTRIM_TEST_PAUSE=POINT makes a run stop there for a SIGKILL."""
    if os.environ.get("VMTRIM_TEST_PAUSE") == point:
        print(f"vmtrim-test: paused at {point}", flush=True)
        time.sleep(3600)


def run_appliance(
    path: Path,
    fmt: str,
    result: SparsifyResult,
    *,
    action: str,
    on_step: Callable[[str], None] | None = None,
    boot_timeout: float = 180.0,
) -> None:
    """Boot the sparsify appliance on ``path`` and fill ``result`` from its report."""
    from vmtrim.lab import ensure_appliance

    def step(text: str) -> None:
        if on_step is not None:
            on_step(text)

    step("building the appliance")
    appliance = ensure_appliance(variant="sparsify")
    writes = action == "trim"
    spec = GuestSpec(
        appliance,
        scenario={"action": action},
        disk=DiskSpec(path, fmt, "virtio-scsi", "unmap" if writes else "ignore"),
    )
    workdir = make_workdir()
    parts: list[tuple[int, int]] = []
    disk_size = 0
    current: Filesystem | None = None
    try:
        step("booting the appliance")
        with DirectGuest(
            spec,
            workdir,
            subject=str(path),
            rewrite_argv=lambda argv: _die_with_us(argv if writes else _read_only(argv)),
        ) as guest:
            ctl = guest.ctl
            ready = ctl.expect("ready", boot_timeout)
            disk_size = int(ready.get("size", "0"))
            _pause("booted")
            while True:
                f = _next_status(ctl, STEP_TIMEOUT)
                kind = f["step"]
                if kind == "error":
                    raise guest.failure(f"the appliance failed: {f.get('message', '?')}")
                if kind == "part":
                    parts.append((int(f["start"]), int(f["size"])))
                elif kind == "skip":
                    size = f.get("size")
                    result.left_alone.append(
                        LeftAlone(
                            f["dev"],
                            f.get("type", "unknown"),
                            int(size) if size else None,
                            f.get("message", ""),
                        )
                    )
                elif kind == "fs":
                    current = Filesystem(
                        f["dev"],
                        f["type"],
                        int(f.get("size") or 0),
                        uuid=f.get("uuid") or None,
                        label=f.get("message") or None,
                        action={"trim": "trimmed", "list": "would trim"}.get(action, "checked"),
                    )
                    result.filesystems.append(current)
                    step(f"{current.device} ({current.type})")
                    if writes:
                        current.allocated_before = allocated_bytes(path)
                    ctl.go()
                elif kind == "trimmed" and current is not None:
                    if writes:
                        current.allocated_after = allocated_bytes(path)
                    current.uuid_after = f.get("uuid") or None
                    if action == "trim":
                        current.fitrim_bytes = int(f.get("trimmed") or 0)
                    if f.get("rc") != "0":
                        current.action = "failed"
                        current.error = f.get("message") or f"exit status {f.get('rc')}"
                    current = None
                    _pause("trimmed")
                    ctl.go()
                elif kind == "sum":
                    digest, _, name = f.get("message", "").partition("  ")
                    result.checksums.setdefault(f["dev"], {})[name] = digest
                elif kind == "done":
                    break
            guest.wait_exit(120)  # QEMU exits on the guest's poweroff, flushing the image
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for start, length in _gaps(parts, disk_size):
        result.left_alone.append(
            LeftAlone(f"gap@{start}", "gap", length, "space between partitions: left alone")
        )


def sparsify(
    path: Path,
    *,
    dry_run: bool = False,
    zeros: bool = False,
    uri: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> SparsifyResult:
    start = time.monotonic()
    if not path.is_file():
        raise BadInput("no such image file", subject=str(path))
    path = path.absolute()
    refuse_if_in_use(path, uri=uri)
    fmt, backing, virtual = _image_facts(path)
    result = SparsifyResult(
        str(path), fmt, backing, virtual, dry_run, allocated_before=allocated_bytes(path)
    )
    try:
        run_appliance(path, fmt, result, action="list" if dry_run else "trim", on_step=on_step)
    except GuestFailed as exc:
        if "lock" in exc.message:
            from vmtrim.errors import ImageInUse

            raise ImageInUse(f"in use: {exc.message}", subject=str(path)) from exc
        raise
    if zeros and not dry_run:
        from vmtrim.sparsify.zeros import discard_zero_clusters

        if on_step is not None:
            on_step("discarding all-zero clusters")
        result.zeros_discarded = discard_zero_clusters(path, fmt)
    result.allocated_after = allocated_bytes(path)
    result.seconds = round(time.monotonic() - start, 1)
    return result


def checksums(path: Path) -> dict[str, dict[str, str]]:
    """sha256 of every file of every filesystem on ``path``, read through the appliance."""
    fmt, backing, virtual = _image_facts(path)
    result = SparsifyResult(str(path), fmt, backing, virtual, True, allocated_bytes(path))
    run_appliance(path.absolute(), fmt, result, action="checksum")
    return result.checksums


def record_history(result: SparsifyResult, db: Path | None = None) -> Path | None:
    """Store the run as kind "sparsify" when the history database exists; its path or None.

    The image path stands in the domain column (a shut-off image may belong to no
    domain libvirt knows). A database that cannot be written raises HistoryUnavailable.
    """
    from vmtrim.history.store import DiskRecord, DomainRecord, History, default_db_path

    where = db or default_db_path()
    if result.dry_run or result.allocated_after is None or not where.exists():
        return None
    failed = [fs for fs in result.filesystems if fs.action == "failed"]
    record = DomainRecord(
        domain=result.path,
        status="failed" if failed else "trimmed",
        reason="; ".join(f"{fs.device}: {fs.error}" for fs in failed) or None,
        seconds=result.seconds,
        guest_trimmed=sum(fs.fitrim_bytes or 0 for fs in result.filesystems),
        disks=[
            DiskRecord(
                target=Path(result.path).name,
                source=result.path,
                virtual_size=result.virtual_size,
                allocated_before=result.allocated_before,
                allocated_after=result.allocated_after,
                guest_trimmed=sum(fs.fitrim_bytes or 0 for fs in result.filesystems),
                verdict="failed" if failed else "trimmed",
                measured_by="du",
            )
        ],
    )
    with History.open(where, create=False) as history:
        run_id = history.begin_run("sparsify", trigger="cli")
        history.record(run_id, record)
        history.end_run(run_id)
    return where
