"""The ``vmtrim`` command line: a thin layer over the library.

Each subcommand lives in its own module under :mod:`vmtrim.cli` and is imported
only when it is run, so ``vmtrim image info`` does not pay for lxml, rich or
libvirt. A subcommand returns its exit code (see :mod:`vmtrim.errors`); errors
are raised as :class:`~vmtrim.errors.VmtrimError` and printed here as one line.

This module imports neither click nor rich: ``vmtrim --version`` is answered
before either is loaded (:mod:`vmtrim.cli.version`), and so is
``vmtrim image info [FLAG...] PATH...`` (:mod:`vmtrim.cli.image_info`, which
declares the options click builds that command from). The click group is in
:mod:`vmtrim.cli.group` (``vmtrim.cli.cli`` still names it).

Exit codes (:mod:`vmtrim.errors`): 0 ok, 1 findings, 2 bad input or usage,
3 environment, 4 internal error, 130 interrupted, and 141 when stdout is a pipe
that closed early (``vmtrim audit ... | head -1``): the output was cut, so
neither 0 ("all passes") nor 1 ("findings") would be true; 141 is what the shell
reports for any tool that a closed pipe stops (128 + SIGPIPE).
"""

from __future__ import annotations

import gc
import os
import sys

from vmtrim.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, VmtrimError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs --version 2 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    import click

__all__ = ["EXIT_BROKEN_PIPE", "SUBCOMMANDS", "cli", "main", "run", "silence_stdout"]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as the shell reports for `yes | head -1`

# name -> ("module:attribute", short help); the order is the order of `vmtrim --help`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("vmtrim.cli.audit:audit", "Find the layer that blocks discard on every disk."),
    "fix": ("vmtrim.cli.fix:fix", "Rewrite libvirt XML or a QEMU command line so discard passes."),
    "trim": ("vmtrim.cli.trim:trim", "Trim guests through the agent and measure the host reclaim."),
    "verify": ("vmtrim.cli.verify:verify", "Prove discard end to end on a throwaway VM."),
    "run": ("vmtrim.cli.run_policy:run", "Trim every domain a policy selects, and record it."),
    "history": ("vmtrim.cli.history:history", "What each domain got back, run after run."),
    "schedule": ("vmtrim.cli.schedule:schedule", "Install the systemd timer that runs the policy."),
    "watch": ("vmtrim.cli.watch:watch", "Trim a domain after a disk move, migration or start."),
    "metrics": ("vmtrim.cli.metrics:metrics", "Prometheus metrics from the history database."),
    "exporter": ("vmtrim.cli.exporter:exporter", "Serve /metrics from the history for Prometheus."),
    "report": (
        "vmtrim.cli.report:report",
        "Write a self-contained HTML report of the fleet's space.",
    ),
    "image": ("vmtrim.cli.image:image", "Read qcow2 and raw allocation without QEMU."),
    "lab": ("vmtrim.cli.lab:lab", "Build the lab guest that verify and the tests boot."),
    "sparsify": (
        "vmtrim.cli.sparsify:sparsify",
        "Give a shut-off image's free space back, in place, through the lab guest.",
    ),
    "compact": ("vmtrim.cli.compact:compact", "Rewrite a shut-off image so that ls -l shrinks."),
}


def __getattr__(name: str) -> Any:
    if name == "cli":  # the click group, built on first use (it imports click)
        from vmtrim.cli.group import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _debug() -> bool:
    return bool(os.environ.get("VMTRIM_DEBUG")) or "--debug" in sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into one line and an exit code."""
    # vmtrim does no linear algebra: numpy's OpenBLAS needs no thread pool, which it
    # would start as numpy is imported and keep spinning (image info: 20-40 ms of CPU).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = run(argv)
    # All is written and flushed: spare the exit the collector's passes over every
    # module's objects (10 ms once numpy is imported). Only cyclic garbage stays
    # unfinalized, which Python never promises to finalize at exit; atexit still runs.
    gc.freeze()
    sys.exit(code)


def run(argv: list[str] | None = None, *, fast: bool = True) -> int:
    """Run ``vmtrim ARGV`` and return its exit code.

    ``image info [FLAG...] PATH...`` is parsed without click (see
    :mod:`vmtrim.cli.image_info`); ``fast=False`` parses every argv with click, as
    the tests do to show that both give the same bytes and exit code.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["--version"]:  # the fast path: no click, no rich
            from vmtrim.cli.version import print_version

            print_version()
            sys.stdout.flush()
            return 0
        kwargs = _fast_image_info(args) if fast else None
        code = _run_click(args) if kwargs is None else _guarded(lambda: _image_info(kwargs))
        # Flush here, inside the handler: at exit a closed pipe would print a traceback.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return silence_stdout()


def _fast_image_info(args: list[str]) -> dict[str, Any] | None:
    # click also answers shell completion requests, whatever the argv
    if args[:2] != ["image", "info"] or "_VMTRIM_COMPLETE" in os.environ:
        return None
    from vmtrim.cli.image_info import fast_args

    return fast_args(args[2:])


def _image_info(kwargs: dict[str, Any]) -> int:
    from vmtrim.cli.image_info import info
    from vmtrim.output import set_quiet

    set_quiet(False)  # what the group does without -q
    return info(**kwargs)


def _run_click(args: list[str]) -> int:
    import click

    from vmtrim.cli.group import cli

    def call() -> object:
        try:
            return cli.main(args=args, prog_name="vmtrim", standalone_mode=False)
        except click.exceptions.Exit as exc:
            return int(exc.exit_code)
        except click.ClickException as exc:
            _show(exc)
            return EXIT_BAD_INPUT
        except click.exceptions.Abort:
            raise KeyboardInterrupt from None

    return _guarded(call)


def _guarded(call: Callable[[], object]) -> int:
    """``call()``'s exit code, with every failure turned into one line and its code."""
    try:
        result = call()
    except VmtrimError as exc:
        if _debug():
            raise
        _error(f"vmtrim: {exc.one_line()}")
        return exc.exit_code
    except KeyboardInterrupt:
        _error("vmtrim: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as exc:
        if _debug():
            raise
        _error(
            f"vmtrim: internal error: {type(exc).__name__}: {exc} (run with --debug for details)"
        )
        return EXIT_INTERNAL
    if isinstance(result, int):
        return result
    return 0


def _error(line: str) -> None:
    from vmtrim.output import safe_text

    # An error names the user's file or domain: escape it like any table cell.
    sys.stderr.write(safe_text(line) + "\n")
    sys.stderr.flush()


def _show(exc: click.ClickException) -> None:
    # click's usage block, with the (possibly user-supplied) message made safe.
    from vmtrim.output import safe_text

    setattr(exc, "message", safe_text(exc.message))  # noqa: B010 (Final in the stubs)
    exc.show()


def silence_stdout() -> int:
    """The reader went away (``| head``): stop quietly, no traceback at exit; exit 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
