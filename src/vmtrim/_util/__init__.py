"""Low-level helpers every layer may use: files and atomic writes, safe XML, host tools."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim._util.deadline import call_with_deadline
    from vmtrim._util.files import (
        atomic_write,
        backup_beside,
        backup_to_state,
        read_input,
    )
    from vmtrim._util.proc import run_tool
    from vmtrim._util.safexml import xml_parser

__all__ = [
    "atomic_write",
    "backup_beside",
    "backup_to_state",
    "call_with_deadline",
    "read_input",
    "run_tool",
    "xml_parser",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "atomic_write": "vmtrim._util.files",
        "backup_beside": "vmtrim._util.files",
        "backup_to_state": "vmtrim._util.files",
        "read_input": "vmtrim._util.files",
        "xml_parser": "vmtrim._util.safexml",
        "run_tool": "vmtrim._util.proc",
        "call_with_deadline": "vmtrim._util.deadline",
    },
)
