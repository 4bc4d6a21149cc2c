"""The man pages under man/: what the click help says now, rendered by man, installed by pip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import helpers
from vmtrim import __version__
from vmtrim.cli.manpage import pages, write_pages

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"
REGENERATE = (
    "pytest tests/test_cli_manpage.py --regenerate-output (or python -m vmtrim.cli.manpage man/)"
)


def test_committed_pages_are_what_the_generator_writes_now() -> None:
    generated = pages()
    if helpers.REGENERATE:  # a command or its help changed
        write_pages(MAN)
    committed = {path.name: path.read_text() for path in MAN.glob("*.1")}
    assert sorted(committed) == sorted(generated), f"stale man/: run {REGENERATE}"
    for name, text in generated.items():
        assert committed[name] == text, f"man/{name} is stale: run {REGENERATE}"
    # One page per command and subcommand, named as man expects.
    assert {"vmtrim.1", "vmtrim-audit.1", "vmtrim-image-info.1", "vmtrim-lab-build.1"} <= set(
        generated
    )


@pytest.mark.parametrize("page", ["vmtrim.1", "vmtrim-audit.1"])
def test_man_renders_the_page_without_warnings(page: str) -> None:
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        ["man", "--warnings", "-l", str(MAN / page)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    text = done.stdout
    assert "EXIT STATUS" in text and "130" in text and "interrupted" in text
    if page == "vmtrim.1":
        assert "_VMTRIM_COMPLETE=bash_source vmtrim" in text
        assert "-q, --quiet" in text
    else:
        assert "-c, --connect URI" in text  # an option as --help spells it
        assert f"vmtrim {__version__}" in text


def test_pip_installs_the_pages_to_share_man_man1(tmp_path: Path) -> None:
    # A copy of the tree: building in place would leave build/ in the checkout.
    source = tmp_path / "src-tree"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    shutil.copytree(MAN, source / "man")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    [wheel] = tmp_path.glob("vmtrim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = f"vmtrim-{__version__}.data/data/share/man/man1/"
    assert sorted(n.removeprefix(data) for n in names if n.startswith(data)) == sorted(pages())
    # The version is written once, in vmtrim.__version__, and the wheel carries it.
    assert wheel.name.startswith(f"vmtrim-{__version__}-")
