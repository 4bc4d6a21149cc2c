"""Helpers shared by the vmtrim fix tests (test_fix_*.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

DATA = Path(__file__).parent / "data" / "fix"
AUDIT_DATA = Path(__file__).parent / "data" / "audit"
_PLACEHOLDER = re.compile(r"@DIR@/((?:[^\s'\",]|,,)+)")


def materialize(name: str, directory: Path, *, images: bool = True) -> str:
    """The test file's text with @DIR@ replaced by ``directory``; images created if asked.

    ``name.qcow2`` becomes a 64 MiB qcow2, anything else a 64 MiB raw file (sparse).
    """
    source = DATA / name if (DATA / name).exists() else AUDIT_DATA / name
    text = source.read_text()
    if images:
        for match in _PLACEHOLDER.finditer(text):
            path = directory / match.group(1).replace(",,", ",")
            if path.exists():
                continue
            fmt = "qcow2" if path.suffix == ".qcow2" else "raw"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", fmt, str(path), "64M"],
                check=True,
                capture_output=True,
            )
    return text.replace("@DIR@", str(directory))


def xml_files() -> list[str]:
    return sorted(p.name for p in DATA.glob("*.xml")) + sorted(
        p.name for p in AUDIT_DATA.glob("*.xml")
    )


def args_files() -> list[str]:
    return sorted(p.name for p in DATA.glob("*.args")) + sorted(
        p.name for p in AUDIT_DATA.glob("*.args")
    )
