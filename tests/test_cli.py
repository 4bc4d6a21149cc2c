"""The CLI skeleton: version, help, exit codes for usage errors."""

from __future__ import annotations

from helpers import vmtrim
from vmtrim import __version__


def test_version() -> None:
    result = vmtrim("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_help_lists_every_command() -> None:
    result = vmtrim("--help")
    assert result.returncode == 0
    for name in ("audit", "fix", "trim", "verify", "image", "lab"):
        assert name in result.stdout


def test_unknown_command_is_usage_error() -> None:
    result = vmtrim("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
