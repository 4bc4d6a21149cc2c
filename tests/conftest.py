"""Shared pytest fixtures and options; the shared helpers are in helpers.py.

Golden files: every input under tests/data/audit/ and tests/data/fix/ has its whole
expected output beside it, named after the input file: ``zoo.xml.audit.json`` and
``zoo.xml.audit.txt`` (audit), ``mixed.xml.out`` and ``mixed.xml.fix.json`` (fix); see
test_golden_audit.py and test_golden_fix.py. Other tests keep whole outputs the same way
(the tables at fixed widths, man pages). ``helpers.assert_golden`` compares, and a
mismatch fails with a unified diff (expected -> actual). When a change to vmtrim's output
is intended, regenerate and review the data files like code:

    .venv/bin/python -m pytest tests/test_golden_*.py --regenerate-output  # + any other failing
    git status tests/ && git diff tests/    # each moved line is a behaviour change: read it

and commit the regenerated files with the change that moved them. Regenerate only on a
tree that holds your own change alone: the files record whatever the tree prints.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers
from services import start_libvirtd
from vmtrim.lab import Appliance, ensure_appliance


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-output",
        action="store_true",
        help="write the golden files (tests/data/**) from vmtrim's output instead of comparing",
    )


def pytest_configure(config: pytest.Config) -> None:
    helpers.REGENERATE = bool(config.getoption("regenerate_output"))


@pytest.fixture(scope="session", autouse=True)
def _import_lazy_hypothesis_modules() -> None:
    """Import the strategy modules hypothesis loads lazily, before any test runs.

    Inside ``@given`` hypothesis raises the recursion limit; pytest rewrites hypothesis's
    own modules (it is a plugin) with ``ast.parse`` as they are imported, and CPython
    3.11's AST constructor then can fail with "AST constructor recursion depth mismatch"
    (python/cpython#106905, pytest-dev/pytest#10874): a full CI run failed that way the
    first time ``st.from_regex`` was built inside a test. Building them in this session
    fixture, before the first test and outside any ``@given`` (hypothesis warns about such
    work during conftest initialisation), imports those modules in a plain frame.
    """
    from hypothesis import strategies as st

    for strategy in (
        st.from_regex(r"[a-z]", fullmatch=True),
        st.characters(blacklist_categories=("Cc", "Cs")),
        st.text(max_size=1),
    ):
        strategy.validate()


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """The real libvirtd (started here if none runs); yields its URI, qemu:///system."""
    daemons = start_libvirtd()
    try:
        yield daemons.uri
    finally:
        daemons.stop()


@pytest.fixture(scope="session")
def appliance() -> Appliance:
    """The lab guest, built on first use (downloads Debian's kernel package on a fresh machine)."""
    return ensure_appliance()
