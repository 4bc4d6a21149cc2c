"""Prove the discard path end to end on a throwaway VM."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.verify.engine import Cell, CellResult, Settings, matrix_cells, run_cell, run_cells

__all__ = [
    "Cell",
    "CellResult",
    "Settings",
    "matrix_cells",
    "run_cell",
    "run_cells",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "Cell": "vmtrim.verify.engine",
        "CellResult": "vmtrim.verify.engine",
        "Settings": "vmtrim.verify.engine",
        "matrix_cells": "vmtrim.verify.engine",
        "run_cell": "vmtrim.verify.engine",
        "run_cells": "vmtrim.verify.engine",
    },
)
