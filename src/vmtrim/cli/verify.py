"""``vmtrim verify``: prove discard end to end on a throwaway VM (one cell or the matrix)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vmtrim.output import (
    Column,
    Row,
    human_bytes,
    print_json,
    print_line,
    progress_console,
    render_table,
)
from vmtrim.verify.engine import FILESYSTEMS, MODES
from vmtrim.vm.guest import BUSES, DISCARDS, FORMATS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from vmtrim.verify.engine import CellResult


@click.command("verify")
@click.option("--bus", type=click.Choice(BUSES), default="virtio-scsi", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="qcow2", show_default=True)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="online",
    show_default=True,
    help="online: mounted -o discard; fstrim in the guest; agent: guest-fstrim from the host.",
)
@click.option("--discard", type=click.Choice(DISCARDS), default="unmap", show_default=True)
@click.option(
    "--size",
    "size_mib",
    type=click.IntRange(1, 1 << 20),
    default=200,
    show_default=True,
    help="MiB to write and delete.",
)
@click.option(
    "--fs",
    type=click.Choice(FILESYSTEMS),
    default="ext4",
    show_default=True,
    help="Guest filesystem.",
)
@click.option(
    "--matrix",
    is_flag=True,
    help="Run every bus x format x mode x discard cell "
    "(--bus, --format, --mode or --discard given too keep only that value).",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 64),
    default=None,
    help="Cells at once with --matrix (default: the CPU count).",
)
@click.option(
    "--machine", default="pc", show_default=True, help="QEMU machine type, e.g. pc-i440fx-3.1."
)
@click.option(
    "--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True
)
@click.option(
    "-c",
    "--connect",
    default=None,
    help="Run the guest as a transient libvirt domain on this URI (qemu:///system).",
)
@click.option(
    "--boot-timeout",
    type=click.FloatRange(0.1, 3600),
    default=90.0,
    show_default=True,
    help="Seconds for the guest to boot and mount its disk.",
)
@click.option("--kernel", type=click.Path(path_type=Path), help="Lab kernel override.")
@click.option("--modules", type=click.Path(path_type=Path), help="Its modules directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--png", type=click.Path(path_type=Path), help="Write a chart of the results.")
@click.option("--no-history", is_flag=True, help="Do not record the cells in the history.")
@click.option("--db", "history_db", metavar="FILE", help="The history database to record in.")
@click.pass_context
def verify(
    ctx: click.Context,
    bus: str,
    fmt: str,
    mode: str,
    discard: str,
    size_mib: int,
    fs: str,
    matrix: bool,
    jobs: int | None,
    machine: str,
    accel: str,
    connect: str | None,
    boot_timeout: float,
    kernel: Path | None,
    modules: Path | None,
    as_json: bool,
    png: Path | None,
    no_history: bool = False,
    history_db: str | None = None,
) -> int:
    """Boot a throwaway guest, write and delete data, and measure the host image shrink.

    Each step (booting, writing, deleting, trimming, measuring) is reported on
    stderr: a spinner on a terminal, one line per step otherwise (none with --quiet).

    \b
    Exit codes: 0 every cell matches what the facts table expects, 1 some cell
    does not, 2 bad input, 3 the guest did not boot or timed out (the serial log's
    tail is shown), 4 internal error, 130 interrupted.
    """
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from vmtrim.lab import ensure_appliance
    from vmtrim.verify.engine import Cell, Settings, host_info, matrix_cells, run_cell, run_cells
    from vmtrim.vm.accel import choose_accel
    from vmtrim.vm.guest import cleanup_on_signals

    err = progress_console()
    with cleanup_on_signals():
        with err.status("preparing the lab guest"):
            appliance = ensure_appliance(kernel, modules)
            chosen = choose_accel(accel, appliance)
        settings = Settings(
            appliance, accel=chosen, machine=machine, connect=connect, boot_timeout=boot_timeout
        )
        if not err.is_terminal:  # redirected: a line per step, or 14 s of silence
            settings = replace(settings, on_step=_step_lines(err))
        if matrix:
            cells = matrix_cells(
                size_mib, fs, **_pinned(ctx, buses=bus, formats=fmt, modes=mode, discards=discard)
            )
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            ) as progress:
                task = progress.add_task("verify matrix", total=len(cells))
                results = run_cells(
                    cells, settings, jobs=jobs, on_done=lambda _: progress.advance(task)
                )
        else:
            cell = Cell(bus, fmt, mode, discard, size_mib, fs)
            with err.status(f"verify {cell.name} ({size_mib} MiB, {chosen})") as status:
                if err.is_terminal:
                    settings = replace(settings, on_step=_step_status(status, chosen))
                results = [run_cell(cell, settings)]
    host = host_info(results, settings)
    if png is not None:
        from vmtrim.verify.chart import write_chart

        write_chart(results, host, png)
    if as_json:
        print_json("vmtrim.verify/1", {"host": host, "cells": [r.to_json() for r in results]})
    else:
        _render(results, host)
    if not no_history:  # history (vmtrim.run.record): a verify run, apart from the fleet
        from vmtrim.run.record import record_verify

        if record_verify(results, history_db) is not None and not any(r.error for r in results):
            return 3
    failed = [r for r in results if r.error]
    if failed:
        for r in failed:
            print_line(f"vmtrim: {r.error}", err=True)
        return max(r.error_exit_code or 3 for r in failed)
    return 0 if all(r.ok for r in results) else 1


def _pinned(ctx: click.Context, **values: str) -> dict[str, tuple[str, ...]]:
    """The matrix dimensions the user pinned on the command line (not the defaults)."""
    names = {"buses": "bus", "formats": "fmt", "modes": "mode", "discards": "discard"}
    return {
        dim: (value,)
        for dim, value in values.items()
        if ctx.get_parameter_source(names[dim]) == click.core.ParameterSource.COMMANDLINE
    }


def _step_lines(err: Console) -> Callable[[str, str], None]:
    def report(cell: str, step: str) -> None:
        err.print(f"verify {cell}: {step}", crop=False, soft_wrap=True)

    return report


def _step_status(status: Status, accel: str) -> Callable[[str, str], None]:
    def report(cell: str, step: str) -> None:
        status.update(f"verify {cell} ({accel}): {step}")

    return report


_MATRIX_COLUMNS = [
    Column("bus"),
    Column("format"),
    Column("mode"),
    Column("discard"),
    Column("du before", justify="right", priority=2),
    Column("du after", justify="right", priority=2),
    Column("reclaimed", justify="right"),
    Column("expected"),
    Column("measured"),
    Column("ok"),
    Column("s", justify="right", priority=1),
]


def _render(results: list[CellResult], host: dict[str, object]) -> None:
    print_line(
        f"QEMU {host['qemu_version']}, machine {host['machine']}, accel {host['accel']}, "
        f"guest kernel {host['guest_kernel']}, runner {host['runner']}"
    )
    if len(results) == 1:
        _render_cell(results[0])
        return
    rows = [
        [
            r.bus,
            r.format,
            r.mode,
            r.discard,
            human_bytes(r.allocated_before),
            human_bytes(r.allocated_after),
            _ratio(r),
            r.expected,
            r.measured or ("error" if r.error else "-"),
            "yes" if r.ok else "NO",
            f"{r.seconds:.0f}",
        ]
        for r in results
    ]
    render_table(_MATRIX_COLUMNS, rows)
    for r in results:
        if not r.ok and not r.error:
            print_line(
                f"{r.bus}/{r.format}/{r.mode}/{r.discard}: expected {r.expected} "
                f"({r.expected_because}), measured {r.measured}"
                + (f"; {r.trim_error}" if r.trim_error else "")
            )


def _ratio(r: CellResult) -> str:
    return "-" if r.reclaim_ratio is None else f"{r.reclaim_ratio:.1%}"


def _render_cell(r: CellResult) -> None:
    rows: list[tuple[str, str] | Row] = [
        ("cell", f"{r.bus}, {r.format}, {r.mode}, discard={r.discard}, {r.fs}"),
        ("written and deleted", human_bytes(r.written_bytes)),
        (
            "host image (du)",
            f"{human_bytes(r.allocated_before)} -> {human_bytes(r.allocated_after)}",
        ),
    ]
    if r.clusters_before is not None:
        rows.append(
            (
                "qcow2 clusters",
                f"{human_bytes(r.clusters_before)} -> {human_bytes(r.clusters_after)}",
            )
        )
    rows += [
        ("reclaimed", f"{human_bytes(r.reclaimed_bytes)} ({_ratio(r)} of the bytes deleted)"),
        Row(["expected", r.expected], [r.expected_because]),  # sentences go below, unshortened
        Row(["measured", r.measured or "-"], [r.trim_error] if r.trim_error else []),
        ("result", "ok" if r.ok else "MISMATCH"),
        ("seconds", f"{r.seconds:.1f}"),
    ]
    render_table([Column("what"), Column("value", shorten="end")], rows, show_header=False)
