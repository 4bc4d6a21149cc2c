"""`vmtrim audit` on every input under tests/data/audit/: the whole output, as golden files.

Each input ``NAME`` (``*.xml``, ``*.args``, and the same in ``pairs/``) has beside it
``NAME.audit.json`` (``--json``) and ``NAME.audit.txt`` (the table, ``NO_COLOR``, piped).
Host probes are off (``--no-probe``), so no filesystem or device of this machine enters
the output; the disk paths in these inputs do not exist here, so no image is read either.
vmtrim runs in the input's directory and is given its bare name, as a user would type it:
a command line without ``-name`` is named after its file, and the table pads its columns
to the longest name, so an absolute path would make the text depend on the checkout.
Regenerate: see conftest.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import assert_golden, vmtrim

AUDIT = Path(__file__).parent / "data" / "audit"
FOLDERS = (AUDIT, AUDIT / "pairs")
INPUTS = sorted(
    path for folder in FOLDERS for path in [*folder.glob("*.xml"), *folder.glob("*.args")]
)
OUTPUTS = (".audit.json", ".audit.txt")


def golden(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def option(path: Path) -> str:
    return "--xml" if path.suffix == ".xml" else "--qemu-args"


def piped_env() -> dict[str, str]:
    """This environment without anything that tells rich about a terminal, plus NO_COLOR."""
    drop = ("COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "NO_COLOR": "1"}


def test_every_input_has_disks() -> None:
    assert len(INPUTS) >= 20
    assert all(path.read_text().strip() for path in INPUTS)


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: str(p.relative_to(AUDIT)))
def test_audit_output_is_the_golden_file(path: Path) -> None:
    command = ["audit", "--no-probe", option(path), path.name]
    as_json = vmtrim(*command, "--json", cwd=path.parent, timeout=60)
    assert as_json.stderr == ""
    doc = json.loads(as_json.stdout)
    assert doc["schema"] == "vmtrim.audit/1"
    # The exit code is the document's verdict: 1 when a disk that counts blocks discard.
    blocks = any(d["verdict"] == "block" and d["exempt"] is None for d in doc["disks"])
    assert as_json.returncode == int(blocks)
    # If a disk's file existed here, audit would read its header and the golden file
    # would describe this machine's image.
    files = [d["source"] for d in doc["disks"] if d["storage"] == "file" and d["source"]]
    assert not [name for name in files if Path(name).exists()]
    assert_golden(as_json.stdout, golden(path, ".audit.json"))

    table = vmtrim(*command, env=piped_env(), cwd=path.parent, timeout=60)
    assert (table.returncode, table.stderr) == (as_json.returncode, "")
    assert "\x1b" not in table.stdout
    assert_golden(table.stdout, golden(path, ".audit.txt"))


def test_no_golden_file_without_its_input() -> None:
    """A renamed or deleted input must not leave its old outputs behind."""
    for folder in FOLDERS:
        for golden in folder.iterdir():
            for suffix in OUTPUTS:
                if golden.name.endswith(suffix):
                    assert golden.with_name(golden.name.removesuffix(suffix)) in INPUTS, golden
