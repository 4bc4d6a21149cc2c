"""`vmtrim fix` on every input under tests/data/fix/: the whole output, as golden files.

Each input ``NAME`` has beside it ``NAME.out`` (the whole text ``-o`` writes) and
``NAME.fix.json`` (the ``--json`` document of the same run). The inputs write their
images as ``@DIR@/...``: they are created (sparse, by qemu-img) in a fresh directory,
which the outputs write back as ``@DIR@``. Host probes are off (``--no-probe``), so no
filesystem of this machine enters the output. Regenerate: see conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fix_support import DATA, materialize
from helpers import assert_golden, normalise, vmtrim

INPUTS = sorted([*DATA.glob("*.xml"), *DATA.glob("*.args")])
OUTPUTS = (".out", ".fix.json")
# The option each input was written for (the default, fix's plain run, for the rest).
OPTIONS = {
    "all-disks.xml": ["--bus", "scsi", "--all-disks"],
    "old-virtio.xml": ["--bus", "scsi", "--detect-zeroes", "unmap"],
    "legacy-mixed.args": ["--modernize"],
}


def golden(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.name)
def test_fix_output_is_the_golden_file(path: Path, tmp_path: Path) -> None:
    source = tmp_path / path.name
    source.write_text(materialize(path.name, tmp_path))
    out = tmp_path / "fixed"
    kind = "--xml" if path.suffix == ".xml" else "--qemu-args"
    options = OPTIONS.get(path.name, [])
    done = vmtrim("fix", "--no-probe", "--json", *options, kind, str(source), "-o", str(out))
    assert done.stderr == ""
    doc = json.loads(done.stdout)
    assert doc["schema"] == "vmtrim.fix/1"
    # The exit code is the document's: 1 while a disk is left blocking discard.
    assert done.returncode == int(any(skip["blocking"] for skip in doc["skipped"]))
    assert doc["written"] == str(out)
    assert_golden(normalise(out.read_text(), tmp_path), golden(path, ".out"))
    assert_golden(normalise(done.stdout, tmp_path), golden(path, ".fix.json"))


def test_no_golden_file_without_its_input() -> None:
    """A renamed or deleted input must not leave its old outputs behind."""
    for file in DATA.iterdir():
        for suffix in OUTPUTS:
            if file.name.endswith(suffix):
                assert file.with_name(file.name.removesuffix(suffix)) in INPUTS, file
