"""Command lines from other builds and from other users: downstream options, a binary that
must never run, huge and deeply nested input, control characters, and fuzzing."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import vmtrim
from vmtrim.errors import BadInput
from vmtrim.sources.qemu_args import binary_version, parse_command_line, read_pid
from vmtrim.sources.qemu_opts import (
    MAX_COMMAND_LINE,
    LineEditor,
    json_set,
    opts_set,
    parse_json_option,
    parse_keyval,
    parse_opts,
    split_words,
)

DATA = Path(__file__).parent / "data" / "audit"
QEMU = "qemu-system-x86_64"
FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- downstream command lines


def test_proxmox_command_line_is_audited() -> None:
    """`qm showcmd` output: Proxmox's -id, its machine type and its -readconfig are read on."""
    proc = vmtrim("audit", "--json", "--no-probe", "--qemu-args", str(DATA / "proxmox.args"))
    assert proc.returncode in (0, 1), proc.stderr
    document = json.loads(proc.stdout)
    disks = {disk["target"]: disk for disk in document["disks"]}
    assert sorted(disks) == ["ide2", "scsi0", "scsi1"]
    assert disks["scsi0"]["discard"] == "unmap" and disks["scsi1"]["discard"] is None
    (domain,) = document["domains"]
    assert domain["name"] == "web01" and domain["machine"] == "pc-q35-8.1+pve0"
    assert not any("-id" in note for note in domain["notes"])  # -id is known, not news


def test_unknown_options_are_notes_that_name_them() -> None:
    text = (
        "qemu-system-x86_64 -frobnicate 3 -machine pc-q35-7.2 -x-newflag"
        " -drive file=/i/a.raw,format=raw,if=none,id=d0,discard=unmap"
        " -vendor-disk file=/i/b.raw -device virtio-blk-pci,drive=d0,id=vd0"
    )
    parsed = parse_command_line(text)
    assert parsed.domain is not None
    assert [disk.ident for disk in parsed.domain.disks] == ["vd0"]
    notes = parsed.domain.notes
    assert len(notes) == 3
    assert "'-frobnicate' (taken with the argument '3')" in notes[0]
    assert "'-x-newflag' (taken as a flag)" in notes[1]
    assert "-vendor-disk" in notes[2] and "vmtrim does not see it" in notes[2]


def test_pid_of_a_proxmox_like_process_never_runs_its_binary(tmp_path: Path) -> None:
    """`exec -a qemu-system-x86_64` a program that would leave a marker if run with --version.

    The audit reads the command line (-id included) and the version from the file;
    the marker never appears. Running the program by hand shows the trap works.
    """
    marker = tmp_path / "ran-with-version"
    source = tmp_path / "fake.c"
    source.write_text(
        "#include <stdio.h>\n#include <string.h>\n#include <unistd.h>\n"
        'const char banner[] = "QEMU emulator version 9.8.7 (not QEMU)\\n";\n'
        "int main(int argc, char **argv) {\n"
        '  for (int i = 1; i < argc; i++) if (!strcmp(argv[i], "--version")) {\n'
        f'    FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n'
        "    fputs(banner, stdout); return 0; }\n"
        "  for (;;) pause();\n}\n"
    )
    fake = tmp_path / "fake-qemu"
    subprocess.run(["gcc", "-O1", "-o", str(fake), str(source)], check=True)
    image = tmp_path / "d.raw"
    image.write_bytes(b"\0" * 65536)
    args = ["-id", "100", "-machine", "pc-q35-7.2",
            "-drive", f"file={image},if=none,id=drive-scsi0,format=raw",
            "-device", "virtio-scsi-pci,id=scsihw0",
            "-device", "scsi-hd,bus=scsihw0.0,drive=drive-scsi0,id=scsi0"]  # fmt: skip
    proc = subprocess.Popen(
        ["bash", "-c", 'exec -a qemu-system-x86_64 "$0" "$@"', str(fake), *args],
        stdin=subprocess.DEVNULL,
    )
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        while not cmdline.read_bytes().startswith(b"qemu-system-x86_64\0"):
            assert proc.poll() is None
        audit = vmtrim("audit", "--json", "--pid", str(proc.pid))
        assert audit.returncode in (0, 1), audit.stderr
        (disk,) = json.loads(audit.stdout)["disks"]
        assert (disk["target"], disk["source"]) == ("scsi0", str(image))
        assert read_pid(proc.pid).qemu_version == (9, 8, 7)  # from the file, as embedded
        assert not marker.exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    subprocess.run([str(fake), "--version"], check=True, capture_output=True)
    assert marker.exists()  # what running it would have done


def test_real_qemu_version_read_from_its_elf_equals_its_own_banner() -> None:
    binary = subprocess.run(["sh", "-c", f"command -v {QEMU}"], capture_output=True, text=True)
    path = os.path.realpath(binary.stdout.strip())
    banner = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    version = binary_version(path)
    assert version is not None
    assert banner.startswith("QEMU emulator version " + ".".join(map(str, version)) + " ")


@pytest.mark.parametrize("path", ["/bin/sh", "/proc/self/status", "/dev/zero", "/nonexistent"])
def test_version_of_something_else_is_unknown(path: str) -> None:
    assert binary_version(path) is None


# ---------------------------------------------------------------- size, nesting, controls


def test_oversized_command_line_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "huge.args"
    path.write_bytes(b"qemu-system-x86_64 -append " + b"x" * MAX_COMMAND_LINE)
    proc = vmtrim("audit", "--qemu-args", str(path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"vmtrim: {path}: ")


def test_one_mebibyte_word_is_read() -> None:
    word = "console=ttyS0 " + "x" * (1 << 20)
    line = split_words(f"qemu-system-x86_64 -append '{word}' -m 1g")
    assert line.argv == ["qemu-system-x86_64", "-append", word, "-m", "1g"]


@pytest.mark.parametrize(
    "value",
    [
        '{"driver":' + "[" * 100_000,
        '{"driver":"raw","file":' * 200 + '{"driver":"file","filename":"/x"}' + "}" * 200,
        "driver=raw," + ",".join("file." * 100 + "driver=raw" for _ in range(2)),
    ],
)
def test_nesting_is_bounded(value: str) -> None:
    with pytest.raises(BadInput, match="nested more than"):
        parse_command_line(["qemu-system-x86_64", "-blockdev", value])


def test_huge_json_integer_is_bad_input() -> None:
    with pytest.raises(BadInput, match="invalid JSON"):
        parse_command_line(["qemu-system-x86_64", "-blockdev", '{"size":' + "9" * 5000 + "}"])


def test_control_characters_never_reach_the_terminal(tmp_path: Path) -> None:
    evil = "\x1b[2J\x1b[31mforged\u202e"
    path = tmp_path / "evil.args"
    path.write_text(
        shlex.join(
            [
                "qemu-system-x86_64",
                "-name",
                f"guest={evil}",
                "-drive",
                f"file=/i/{evil}.raw,if=virtio,format=raw",
                f"-opt{evil}",
                f"x{evil}",
            ]
        )
        + "\n"
    )
    proc = vmtrim("audit", "--no-probe", "--qemu-args", str(path))
    assert proc.returncode in (0, 1), proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b" not in stream and "\u202e" not in stream
    assert "\\x1b[2J" in proc.stdout  # shown, escaped
    bad = tmp_path / "bad.args"
    bad.write_text(shlex.join(["qemu-system-x86_64", "-device", f"scsi-hd,drive={evil}"]))
    proc = vmtrim("audit", "--qemu-args", str(bad))
    assert proc.returncode == 2 and "\x1b" not in proc.stderr and "\\x1b" in proc.stderr


# ---------------------------------------------------------------- fuzzing


_SHELLISH = st.text(alphabet=st.sampled_from(list(" \t\n\\'\"#$,=-{}[]:|;&<>()`\0aZ09é")))


@FUZZ
@given(_SHELLISH)
def test_fuzz_splitter_raises_only_bad_input(text: str) -> None:
    try:
        line = split_words(text)
    except BadInput:
        return
    for word in line.words:  # every word's span lies inside the text, in order
        assert 0 <= word.start <= word.end <= len(text)


_ARGV = st.lists(
    st.text(st.characters(codec="utf-8", blacklist_characters="\0"), max_size=30),
    max_size=8,
).filter(lambda argv: not any("\\\n" in a or "\\\r\n" in a for a in argv))


@FUZZ
@given(_ARGV)
def test_fuzz_shell_quoting_round_trips(argv: list[str]) -> None:
    """What a shell would read back from shlex.join, vmtrim reads back too."""
    assert split_words(shlex.join(argv)).argv == argv


@dataclass
class _Edit:
    word: int
    value: str
    insert: list[str]


_TEXT = st.characters(codec="utf-8", blacklist_characters="\0")
_WORD = st.characters(codec="utf-8", blacklist_characters="\0\n\\")
_EDITS = st.lists(
    st.builds(
        _Edit,
        st.integers(0, 20),
        st.text(_TEXT, max_size=12),
        st.lists(st.text(_WORD, min_size=1, max_size=8), max_size=2),
    ),
    max_size=5,
)  # fmt: skip


@FUZZ
@given(st.sampled_from(sorted(p.name for p in DATA.glob("*.args"))), _EDITS, st.booleans())
def test_fuzz_edits_read_back_and_keep_other_bytes(
    name: str, edits: list[_Edit], nul: bool
) -> None:
    """Any value change or insertion renders to text that splits into the edited argv."""
    text = (DATA / name).read_text()
    if nul:
        text = "\0".join(split_words(text).argv) + "\0"
    line = split_words(text)
    editor = LineEditor(line)
    for edit in edits:
        index = edit.word % len(line.words)
        editor.set_value(index, edit.value)
        if edit.insert:
            editor.insert_after(index, edit.insert)
    rendered = editor.render()  # raises if it would not read back
    assert split_words(rendered).argv == editor.argv()
    if not edits:
        assert rendered == text


@FUZZ
@given(st.text(max_size=60), st.sampled_from(["-blockdev", "-device"]))
def test_fuzz_option_values_raise_only_bad_input(text: str, option: str) -> None:
    with contextlib.suppress(BadInput):
        parse_keyval(text, "t", option)
    with contextlib.suppress(BadInput):
        parse_json_option(text, "t", option)
    parse_opts(text, implied="driver")


_KEY = st.text(st.characters(whitelist_categories=("Ll", "Nd"), whitelist_characters="-._"),
               min_size=1, max_size=8)  # fmt: skip


@FUZZ
@given(st.text(max_size=40), _KEY, st.text(max_size=10))
def test_fuzz_opts_set_sets_exactly_one_key(text: str, key: str, value: str) -> None:
    before = parse_opts(text)
    after = parse_opts(opts_set(text, key, value))
    if value:
        assert after.get(key) == value
    assert {k: v for k, v in after.items() if k != key} == {
        k: v for k, v in before.items() if k != key
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip


@FUZZ
@given(st.dictionaries(st.text(max_size=4), _JSON, max_size=4), _KEY, _JSON, st.booleans())
def test_fuzz_json_set_edits_in_place(spec: dict[str, object], key: str, value: object,
                                      spaced: bool) -> None:  # fmt: skip
    text = json.dumps(spec, separators=(", ", ": ") if spaced else (",", ":"))
    assert json.loads(json_set(text, (), key, value)) == {**spec, key: value}
