"""Prove discard end to end: boot the lab guest, write, delete, trim, measure the host image.

One *cell* is one combination of bus x image format x trim mode x discard setting
(and guest filesystem). It runs the 8 steps of issue 5:

1. make a fresh image (raw, or qcow2 by ``qemu-img convert``) with a filesystem,
   made on the host with ``mkfs.<fs>`` on the whole disk;
2. boot the guest with that disk on the bus and discard setting under test
   (:mod:`vmtrim.vm.guest` directly, or :mod:`vmtrim.vm.libvirt`);
3. the guest writes N MiB from /dev/urandom and syncs;
4. the host measures the image: ``du`` bytes, and allocated qcow2 clusters;
5. the guest deletes the file;
6. the trim in the mode under test: ``online`` (mounted ``-o discard``), ``fstrim``
   in the guest, or ``agent`` (guest-fstrim sent from the host);
7. the guest syncs until its discard counter stops moving; the host measures again;
8. the guest unmounts and powers off.

The expected outcome of a cell comes from :mod:`vmtrim.facts` (the same rows the
audit uses), and a cell is ``ok`` when the measurement agrees with it: a reclaiming
cell must get back at least :data:`RECLAIM_RATIO` of the bytes deleted, a
non-reclaiming one at most :data:`NONE_RATIO`.
"""

from __future__ import annotations

import itertools
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmtrim._util.proc import run_tool
from vmtrim._util.versions import Version, format_version, machine_version, parse_version
from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.lab import Appliance
from vmtrim.vm.guest import (
    BUSES,
    DISCARDS,
    FORMATS,
    Boot,
    DirectGuest,
    DiskSpec,
    Guest,
    GuestSpec,
    make_workdir,
    qemu_version,
    stop_all,
)

MODES = ("online", "fstrim", "agent")
FILESYSTEMS = ("ext4", "ext3", "xfs", "btrfs")
RECLAIM_RATIO = 0.99
NONE_RATIO = 0.01
MIN_DISK_MIB = 1024
SCHEMA = "vmtrim.verify/1"


@dataclass(frozen=True)
class Cell:
    bus: str = "virtio-scsi"
    format: str = "qcow2"
    mode: str = "online"
    discard: str = "unmap"
    size_mib: int = 200
    fs: str = "ext4"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("bus", self.bus, BUSES),
            ("format", self.format, FORMATS),
            ("mode", self.mode, MODES),
            ("discard", self.discard, DISCARDS),
            ("fs", self.fs, FILESYSTEMS),
        ):
            if value not in allowed:
                raise BadInput(f"--{name} must be one of {', '.join(allowed)}", subject=value)
        if self.size_mib < 1:
            raise BadInput("--size must be at least 1 MiB", subject=str(self.size_mib))

    @property
    def name(self) -> str:
        return f"{self.bus}/{self.format}/{self.mode}/{self.discard}"


@dataclass(frozen=True)
class Settings:
    """How cells run: the same for every cell of a matrix."""

    appliance: Appliance
    accel: str = "tcg"
    machine: str = "pc"
    connect: str | None = None  # libvirt URI; None runs QEMU directly
    boot_timeout: float = 90.0
    on_step: Callable[[str, str], None] | None = None  # (cell name, step): progress lines


@dataclass
class Measurement:
    du: int
    clusters: int | None  # allocated qcow2 clusters x cluster size, None for raw


@dataclass
class CellResult:
    bus: str
    format: str
    mode: str
    discard: str
    fs: str
    written_bytes: int | None = None
    allocated_before: int | None = None
    allocated_after: int | None = None
    clusters_before: int | None = None
    clusters_after: int | None = None
    reclaimed_bytes: int | None = None
    reclaim_ratio: float | None = None
    expected: str = "reclaim"
    expected_because: str = ""
    measured: str | None = None
    ok: bool = False
    seconds: float = 0.0
    guest_discarded_bytes: int | None = None
    trimmed_reported: int | None = None
    trim_error: str | None = None
    runner: str = "qemu"
    error: str | None = None
    error_exit_code: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for private in ("info", "error_exit_code"):
            data.pop(private)
        return data


# --- expectation ------------------------------------------------------------------------


def expectation(
    cell: Cell, qemu: tuple[int, ...], machine: str, guest_kernel: tuple[int, ...] | None
) -> tuple[str, str]:
    """("reclaim" | "none", why) for a cell on this host, from the facts table."""
    from vmtrim.facts import FACTS

    if cell.discard == "ignore":
        source = FACTS["default_discard"].source
        return "none", f"discard=ignore drops every guest discard ({source})"
    needed = [FACTS["discard_option"]]
    if cell.format == "qcow2":
        needed.append(FACTS["qcow2_discard"])
    if cell.bus == "virtio-blk":
        needed.append(FACTS["virtio_blk_discard"])
    for fact in needed:
        if fact.qemu is not None and qemu < fact.qemu:
            return (
                "none",
                f"QEMU {format_version(qemu)} < {format_version(fact.qemu)}: {fact.summary}",
            )
        mv = machine_version(machine)
        if fact.machine is not None and mv is not None and mv < fact.machine:
            return (
                "none",
                f"machine {machine} < {format_version(fact.machine)}: "
                f"{fact.summary} ({fact.source})",
            )
    guest_fact = FACTS["virtio_blk_guest"]
    if (
        cell.bus == "virtio-blk"
        and guest_kernel is not None
        and guest_fact.linux is not None
        and guest_kernel < guest_fact.linux
    ):
        return "none", (
            f"guest Linux {format_version(guest_kernel)} < "
            f"{format_version(guest_fact.linux)}: {guest_fact.summary}"
        )
    return "reclaim", "discard=unmap and every layer supports discard"


def expected_for(
    cell: Cell, settings: Settings, info: dict[str, Any] | None = None
) -> tuple[str, str]:
    """The expectation for the QEMU and machine the cell really ran on.

    ``info`` is the booted guest's (QEMU's own version over QMP, or libvirt's for the QEMU
    it runs, and the machine type with its alias resolved). Without it (the guest never
    booted) the runner's QEMU is asked: libvirt's for ``--connect``, else the one on PATH.
    """
    kernel = parse_version(settings.appliance.kernel_version)
    guest = kernel[:2] if kernel else None
    qemu = parse_version((info or {}).get("qemu_version")) or runner_qemu_version(settings)
    machine = (info or {}).get("machine") or settings.machine
    return expectation(cell, qemu, machine, guest)


def runner_qemu_version(settings: Settings) -> Version:
    """The version of the QEMU that runs the cells."""
    if settings.connect is None:
        return qemu_version()
    from vmtrim.channels.libvirt import connection

    with connection(settings.connect) as conn:
        return conn.version_numbers()[0] or qemu_version()


def classify(ratio: float | None) -> str | None:
    if ratio is None:
        return None
    if ratio >= RECLAIM_RATIO:
        return "reclaim"
    if ratio <= NONE_RATIO:
        return "none"
    return "partial"


# --- images and measurement -----------------------------------------------------------------


def measure(image: Path, fmt: str) -> Measurement:
    from vmtrim.image.allocation import allocated_bytes

    clusters = None
    if fmt == "qcow2":
        from vmtrim.image.info import inspect

        info = inspect(image)
        if info.allocated_clusters is not None and info.cluster_size is not None:
            clusters = info.allocated_clusters * info.cluster_size
    return Measurement(du=allocated_bytes(image), clusters=clusters)


def make_image(workdir: Path, cell: Cell) -> Path:
    """Step 1: a sparse disk of at least 1 GiB with the filesystem on the whole disk."""
    size = max(MIN_DISK_MIB, 2 * cell.size_mib + 256) * 1024 * 1024
    raw = workdir / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    mkfs = f"mkfs.{cell.fs}"
    if shutil.which(mkfs) is None:
        raise EnvironmentProblem(f"{mkfs} is not installed", subject=cell.name)
    force = {"ext4": "-F", "ext3": "-F", "xfs": "-f", "btrfs": "-f"}[cell.fs]
    run_tool([mkfs, "-q", force, str(raw)], subject=cell.name)
    if cell.format == "raw":
        return raw
    qcow2 = workdir / "disk.qcow2"
    run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], subject=cell.name)
    raw.unlink()
    return qcow2


# --- one cell ------------------------------------------------------------------------------


def _boot_direct(spec: GuestSpec, workdir: Path, subject: str) -> AbstractContextManager[Guest]:
    return DirectGuest(spec, workdir, subject=subject)


def _booter(settings: Settings) -> Boot:
    if settings.connect is None:
        return _boot_direct
    from vmtrim.vm.libvirt import booter

    return booter(settings.connect)


def run_cell(cell: Cell, settings: Settings) -> CellResult:
    """Run the 8 steps; a guest that fails raises GuestFailed (exit 3), after cleanup."""
    start = time.monotonic()
    result = CellResult(
        cell.bus,
        cell.format,
        cell.mode,
        cell.discard,
        cell.fs,
        runner="libvirt" if settings.connect else "qemu",
    )
    result.expected, result.expected_because = expected_for(cell, settings)

    def step(what: str) -> None:
        if settings.on_step is not None:
            settings.on_step(cell.name, what)

    workdir = make_workdir()
    try:
        image = make_image(workdir, cell)
        step("booting the guest")
        spec = GuestSpec(
            settings.appliance,
            scenario={
                "mode": cell.mode,
                "fs": cell.fs,
                "size": str(cell.size_mib),
                "agent": "1" if cell.mode == "agent" else "0",
            },
            disk=DiskSpec(image, cell.format, cell.bus, cell.discard),
            agent=cell.mode == "agent",
            machine=settings.machine,
            accel=settings.accel,
        )
        with _booter(settings)(spec, workdir, cell.name) as guest:
            ctl = guest.ctl
            ready = ctl.expect("ready", settings.boot_timeout)
            result.info = {**guest.info(), "guest_kernel": ready.get("kernel")}
            result.expected, result.expected_because = expected_for(cell, settings, result.info)
            step(f"writing {cell.size_mib} MiB")
            ctl.go()
            written = ctl.expect("written", 60 + cell.size_mib * 1.0)
            before = measure(image, cell.format)
            step("deleting" if cell.mode == "agent" else f"deleting and trimming ({cell.mode})")
            ctl.go()
            if cell.mode == "agent":
                ctl.expect("deleted", 120)
                step("trimming (guest-fstrim from the host)")
                fstrim = guest.agent_fstrim(0)
                result.trimmed_reported = fstrim.trimmed
                result.trim_error = "; ".join(f"{p.path}: {p.error}" for p in fstrim.errors) or None
                ctl.go()
            trimmed = ctl.expect("trimmed", 300)
            step("measuring the host image")
            after = measure(image, cell.format)
            ctl.go()
            ctl.expect("done", 120)
            guest.wait_exit(60)
        if cell.mode == "fstrim":
            report = ctl.seen.get("fstrim", {})
            result.trimmed_reported = _int(report.get("trimmed"))
            if report.get("rc") not in (None, "0"):
                result.trim_error = f"fstrim exited with status {report.get('rc')}"
        result.written_bytes = _int(written.get("bytes"))
        discarded_before = _int(written.get("discarded")) or 0
        discarded_after = _int(trimmed.get("discarded"))
        if discarded_after is not None:
            result.guest_discarded_bytes = discarded_after - discarded_before
        result.allocated_before, result.allocated_after = before.du, after.du
        result.clusters_before, result.clusters_after = before.clusters, after.clusters
        result.reclaimed_bytes = before.du - after.du
        if result.written_bytes:
            result.reclaim_ratio = round(result.reclaimed_bytes / result.written_bytes, 4)
        result.measured = classify(result.reclaim_ratio)
        result.ok = result.measured == result.expected
        return result
    finally:
        result.seconds = round(time.monotonic() - start, 1)
        shutil.rmtree(workdir, ignore_errors=True)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# --- the matrix ------------------------------------------------------------------------------


def matrix_cells(
    size_mib: int,
    fs: str = "ext4",
    *,
    buses: tuple[str, ...] = BUSES,
    formats: tuple[str, ...] = FORMATS,
    modes: tuple[str, ...] = MODES,
    discards: tuple[str, ...] = DISCARDS,
) -> list[Cell]:
    """Every bus x format x mode x discard cell (or the slice the arguments keep)."""
    return [
        Cell(bus, fmt, mode, discard, size_mib, fs)
        for bus, fmt, mode, discard in itertools.product(buses, formats, modes, discards)
    ]


def run_cells(
    cells: list[Cell],
    settings: Settings,
    *,
    jobs: int | None = None,
    on_done: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    """Run cells in parallel (up to the CPU count); a failing cell is recorded, not raised."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(cells)))

    def one(cell: Cell) -> CellResult:
        try:
            return run_cell(cell, settings)
        except EnvironmentProblem as exc:
            failed = CellResult(
                cell.bus,
                cell.format,
                cell.mode,
                cell.discard,
                cell.fs,
                runner="libvirt" if settings.connect else "qemu",
                error=exc.one_line(),
                error_exit_code=exc.exit_code,
            )
            failed.expected, failed.expected_because = expected_for(cell, settings)
            return failed

    results: dict[Cell, CellResult] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="vmtrim-cell") as pool:
        futures: dict[Future[CellResult], Cell] = {pool.submit(one, c): c for c in cells}
        try:
            for future in _as_completed(futures):
                res = future.result()
                results[futures[future]] = res
                if on_done is not None:
                    on_done(res)
        except BaseException:
            # Ctrl-C/SIGTERM: kill the running guests now, or the pool would wait for them.
            for f in futures:
                f.cancel()
            stop_all()
            raise
    return [results[c] for c in cells]


def _as_completed(futures: dict[Future[CellResult], Cell]) -> Iterator[Future[CellResult]]:
    from concurrent.futures import as_completed

    # A short timeout loop keeps the main thread responsive to Ctrl-C/SIGTERM.
    pending = set(futures)
    while pending:
        try:
            for f in as_completed(pending, timeout=0.5):
                pending.discard(f)
                yield f
        except TimeoutError:
            continue


def host_info(results: list[CellResult], settings: Settings) -> dict[str, Any]:
    info: dict[str, Any] = next((r.info for r in results if r.info), {})
    return {
        "qemu_version": info.get("qemu_version") or format_version(runner_qemu_version(settings)),
        "machine": info.get("machine") or settings.machine,
        "accel": info.get("accel") or settings.accel,
        "guest_kernel": info.get("guest_kernel") or settings.appliance.kernel_version,
        "runner": "libvirt" if settings.connect else "qemu",
        "connect": settings.connect,
        "host_kernel": platform.release(),
        "cpus": os.cpu_count(),
    }
