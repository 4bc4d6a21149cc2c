"""The ``vmtrim`` command line: a thin layer over the library.

Each subcommand lives in its own module under :mod:`vmtrim.cli` and is imported
only when it is run, so ``vmtrim image info`` does not pay for lxml, rich or
libvirt. A subcommand returns its exit code (see :mod:`vmtrim.errors`); errors
are raised as :class:`~vmtrim.errors.VmtrimError` and printed here as one line.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from vmtrim import __version__
from vmtrim.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, VmtrimError

__all__ = ["cli", "main", "run"]

# name -> "module:attribute"; the order is the order of `vmtrim --help`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("vmtrim.cli.audit:audit", "Find the layer that blocks discard on every disk."),
    "fix": ("vmtrim.cli.fix:fix", "Rewrite libvirt XML or a QEMU command line so discard passes."),
    "trim": ("vmtrim.cli.trim:trim", "Trim guests through the agent and measure the host reclaim."),
    "verify": ("vmtrim.cli.verify:verify", "Prove discard end to end on a throwaway VM."),
    "image": ("vmtrim.cli.image:image", "Read qcow2 and raw allocation without QEMU."),
    "lab": ("vmtrim.cli.lab:lab", "Build the lab guest that verify and the tests boot."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        target, help_text = SUBCOMMANDS[cmd_name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise

            @click.command(cmd_name, help=help_text + " (not available in this build)")
            def missing() -> int:
                raise click.UsageError(f"'{cmd_name}' is not available in this build")

            return missing
        command = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help comes from the table above, so --help imports nothing.
        rows = [(name, help_text) for name, (_, help_text) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vmtrim")
@click.option("--debug", is_flag=True, help="Log what vmtrim does to stderr; tracebacks on errors.")
def cli(debug: bool) -> None:
    """vmtrim: make thin-provisioned VM disks give freed space back to the host.

    \b
    Exit codes: 0 all passes (or already applied), 1 findings or failed
    verification, 2 bad input or usage, 3 environment or connection error,
    4 internal error (a bug in vmtrim), 130 interrupted.
    """
    if debug:
        os.environ["VMTRIM_DEBUG"] = "1"
        _log_to_stderr()


def _log_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmtrim: %(name)s: %(message)s"))
    logger = logging.getLogger("vmtrim")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _debug() -> bool:
    return bool(os.environ.get("VMTRIM_DEBUG")) or "--debug" in sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into one line and an exit code."""
    code = run(argv)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    try:
        result: Any = cli.main(args=argv, prog_name="vmtrim", standalone_mode=False)
    except VmtrimError as exc:
        if _debug():
            raise
        click.echo(f"vmtrim: {exc.one_line()}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_BAD_INPUT
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("vmtrim: interrupted", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if _debug():
            raise
        click.echo(
            f"vmtrim: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
            err=True,
        )
        return EXIT_INTERNAL
    if isinstance(result, int):
        return result
    return 0
