"""Every README example prints what the README shows.

Two kinds of example are run:

- a ```` ```console ```` block: its first line is ``$ COMMAND``; the rest is what COMMAND
  prints on stdout, piped, with ``NO_COLOR`` set, run by ``sh`` from the repository root;
- a ```` ```python ```` block followed directly by a ```` ```text ```` block: the Python
  runs from the repository root and must print exactly the text.

Blocks fenced ```` ```sh ```` are command lists to copy (they need a host, a guest or
root), and are not run here; the demo's output is checked by the verify tests instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]


def console_examples() -> list[tuple[str, str]]:
    out = []
    for lang, body in blocks():
        if lang == "console":
            first, _, rest = body.partition("\n")
            assert first.startswith("$ "), f"a console block must start with '$ ': {first!r}"
            out.append((first[2:], rest))
    return out


def python_examples() -> list[tuple[str, str]]:
    found = blocks()
    return [
        (body, found[i + 1][1])
        for i, (lang, body) in enumerate(found[:-1])
        if lang == "python" and found[i + 1][0] == "text"
    ]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    out["NO_COLOR"] = "1"
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    return out


def test_the_readme_has_examples_that_run() -> None:
    assert len(console_examples()) >= 3 and python_examples()


@pytest.mark.parametrize(("command", "expected"), console_examples(), ids=lambda v: v[:60])
def test_console_example(command: str, expected: str) -> None:
    done = subprocess.run(
        ["sh", "-c", command], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
    )
    assert done.stdout == expected, done.stderr


@pytest.mark.parametrize(("code", "expected"), python_examples(), ids=lambda v: v[:40])
def test_python_example(code: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.stdout == expected, done.stderr
