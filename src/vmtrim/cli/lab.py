"""``vmtrim lab build``: build (or find in the cache) the guest that verify boots."""

from __future__ import annotations

from pathlib import Path

import click

from vmtrim.output import Column, print_json, print_line, progress_console, render_table


@click.group("lab")
def lab() -> None:
    """The lab guest: a kernel and a small initramfs, cached under $XDG_CACHE_HOME/vmtrim."""


@lab.command("build")
@click.option("--kernel", type=click.Path(path_type=Path), help="Kernel image to use.")
@click.option(
    "--modules",
    type=click.Path(path_type=Path),
    help="Its modules directory (.../lib/modules/VERSION, with modules.dep).",
)
@click.option("--rebuild", is_flag=True, help="Build even if the cache is current.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def build(kernel: Path | None, modules: Path | None, rebuild: bool, as_json: bool) -> int:
    """Build the lab appliance, or reuse the cached one when no input changed."""
    from vmtrim.lab import ensure_appliance

    # stderr, so --json stays clean; nothing with --quiet
    with progress_console().status("building the lab guest"):
        appliance = ensure_appliance(kernel, modules, rebuild=rebuild)
    if as_json:
        print_json("vmtrim.lab/1", appliance.to_json())
        return 0
    state = "built" if appliance.built else "up to date (cached)"
    print_line(f"lab guest {state}: kernel {appliance.kernel_version} from {appliance.origin}")
    rows = [["kernel", str(appliance.kernel)], ["initrd", str(appliance.initrd)]]
    render_table([Column("file"), Column("path", shorten="middle")], rows, show_header=False)
    return 0
