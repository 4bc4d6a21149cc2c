"""The click group behind ``vmtrim``: global options and lazily imported subcommands."""

from __future__ import annotations

import importlib
import os
import sys

import click

from vmtrim.cli import SUBCOMMANDS, silence_stdout

__all__ = ["cli"]

EXIT_HELP = """\b
Exit codes:
  0    everything passes, or the change was already applied
  1    findings, or a verification failed
  2    bad input or usage
  3    environment or connection error (no libvirtd, no agent, QEMU failed)
  4    internal error (a bug in vmtrim; --debug shows the traceback)
  130  interrupted (Ctrl-C, SIGTERM)
  141  stdout was a pipe that closed early (| head): the output was cut"""

COMPLETION_HELP = """\b
Shell completion (domain names come from -c URI or $LIBVIRT_DEFAULT_URI):
  eval "$(_VMTRIM_COMPLETE=bash_source vmtrim)"    # in ~/.bashrc
  eval "$(_VMTRIM_COMPLETE=zsh_source vmtrim)"     # in ~/.zshrc
  _VMTRIM_COMPLETE=fish_source vmtrim | source     # fish"""

EPILOG = EXIT_HELP + "\n\n" + COMPLETION_HELP


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

            # Hidden: no man page for it; --help lists it from SUBCOMMANDS all the same.
            @click.command(cmd_name, help=help_text + " (not available in this build)", hidden=True)
            def missing() -> int:
                raise click.UsageError(f"'{cmd_name}' is not available in this build")

            return missing
        command = getattr(module, attribute)
        assert isinstance(command, click.Command)
        _complete_domain_arguments(command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # click would turn a closed pipe into exit 1, which means "findings".
            raise click.exceptions.Exit(silence_stdout()) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help comes from the table above, so --help imports nothing.
        rows = [(name, help_text) for name, (_, help_text) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _complete_domain_arguments(command: click.Command) -> None:
    """Every ``[DOMAIN...]`` argument (audit, fix, trim) completes libvirt domain names."""
    from vmtrim.cli.complete import complete_domains

    for param in command.params:
        if isinstance(param, click.Argument) and "DOMAIN" in (param.metavar or ""):
            # What shell_complete= sets; done here so each command need not repeat it.
            param._custom_shell_complete = complete_domains


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from vmtrim.cli.version import print_version

    print_version()
    ctx.exit(0)


def _log_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmtrim: %(name)s: %(message)s"))
    logger = logging.getLogger("vmtrim")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG,
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show vmtrim's version and the QEMU, libvirt and facts table it found.",
)
@click.option("--debug", is_flag=True, help="Log what vmtrim does to stderr; tracebacks on errors.")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bars or notes; results and errors still print.",
)
def cli(debug: bool, quiet: bool) -> None:
    """Make thin-provisioned VM disks give freed space back to the host."""
    if debug:
        os.environ["VMTRIM_DEBUG"] = "1"
        _log_to_stderr()
    from vmtrim.output import set_quiet

    set_quiet(quiet)  # set every run: tests call vmtrim.cli.run more than once
