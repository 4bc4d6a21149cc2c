"""`vmtrim fix --qemu-args` keeps the user's text: the --dry-run diff applies with the real
`patch`, and -o differs from the input only on the lines whose values the fix changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fix_support import AUDIT_DATA, DATA, materialize
from helpers import vmtrim
from test_fix_qemu import OPTION_SETS
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import FixOptions, FixResult
from vmtrim.fix.qemu import fix_qemu_args
from vmtrim.sources.qemu_args import tokenize

INPUTS = sorted(
    str(path.relative_to(root)) for root in (DATA, AUDIT_DATA) for path in root.rglob("*.args")
)


def fix(text: str | bytes, options: FixOptions) -> FixResult:
    return fix_qemu_args(text, options, probes=HostProbes(local=False), read_images=False)


def flags(options: FixOptions) -> list[str]:
    out = ["--no-probe"]
    if options.detect_zeroes:
        out += ["--detect-zeroes", options.detect_zeroes]
    if options.bus:
        out += ["--bus", options.bus]
    out += ["--all-disks"] * options.all_disks + ["--modernize"] * options.modernize
    return out


def patched(original: Path, diff: str, work: Path) -> str:
    """Apply ``diff`` to a copy of ``original`` with patch(1): first --dry-run, then for real."""
    copy = work / "patched.args"
    copy.write_bytes(original.read_bytes())
    for extra in (["--dry-run"], []):
        done = subprocess.run(["patch", *extra, "--batch", "--forward", str(copy)], input=diff,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    return copy.read_text()


def changed_lines(old: str, new: str) -> tuple[list[str], list[str]]:
    """The lines only in ``old`` and only in ``new`` (as a diff shows them)."""
    import difflib

    removed, added = [], []
    for line in difflib.ndiff(old.splitlines(), new.splitlines()):
        if line.startswith("- "):
            removed.append(line[2:])
        elif line.startswith("+ "):
            added.append(line[2:])
    return removed, added


@pytest.mark.parametrize("name", INPUTS)
def test_dry_run_diff_applies_with_patch_for_every_option_set(name: str, tmp_path: Path) -> None:
    text = materialize(name, tmp_path, images=False)
    original = tmp_path / "input.args"
    original.write_text(text)
    for options in OPTION_SETS:
        result = fix(text, options)
        assert patched(original, result.diff, tmp_path) == result.new_text, options
        removed, _added = changed_lines(text, result.new_text)
        # Each removed line holds a value the fix changed: a disk's option or a controller.
        touched = {change.disk for change in result.changes}
        assert len(removed) <= max(len(result.changes), 1) and (removed == []) == (not touched)


@pytest.mark.parametrize("name", INPUTS)
def test_cli_dry_run_and_output_agree_and_keep_the_rest(name: str, tmp_path: Path) -> None:
    """The real command: --dry-run's diff applied by patch is what -o writes."""
    text = materialize(name, tmp_path, images=False)
    original = tmp_path / "input.args"
    original.write_text(text)
    options = FixOptions(bus="scsi", modernize=True, detect_zeroes="unmap")
    dry = vmtrim("fix", "--qemu-args", str(original), "--dry-run", *flags(options))
    out = tmp_path / "out.args"
    written = vmtrim("fix", "--qemu-args", str(original), "-o", str(out), *flags(options))
    assert dry.returncode in (0, 1) and written.returncode == dry.returncode, dry.stderr
    new = out.read_text()
    assert patched(original, dry.stdout, tmp_path) == new
    assert original.read_text() == text  # the input is never touched
    # Comment lines, the environment prefix and every untouched option line are kept.
    removed, _added = changed_lines(text, new)
    kept = [line for line in text.splitlines() if line not in removed]
    assert all(line in new.splitlines() for line in kept)
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            assert line in new.splitlines()


@pytest.mark.parametrize("name", INPUTS)
def test_nul_separated_input_stays_nul_separated(name: str, tmp_path: Path) -> None:
    """/proc/PID/cmdline form: the output is NUL-separated, and untouched words are the same."""
    argv = tokenize(materialize(name, tmp_path, images=False))
    raw = ("\0".join(argv) + "\0").encode()
    options = FixOptions(bus="scsi", modernize=True)
    result = fix(raw, options)
    shell = fix(materialize(name, tmp_path, images=False), options)
    assert tokenize(result.new_text) == tokenize(shell.new_text)
    assert "\n" not in result.new_text and result.new_text.endswith("\0")
    old_words, new_words = set(argv), set(tokenize(result.new_text))
    assert len(old_words - new_words) <= len(result.changes)


def test_diff_applies_to_a_file_without_a_final_newline(tmp_path: Path) -> None:
    text = materialize("legacy-mixed.args", tmp_path, images=False).rstrip("\n")
    original = tmp_path / "input.args"
    original.write_text(text)
    result = fix(text, FixOptions(modernize=True))
    assert not result.new_text.endswith("\n")  # -o writes no newline the user did not have
    assert "\\ No newline at end of file" in result.diff
    assert patched(original, result.diff, tmp_path) == result.new_text
