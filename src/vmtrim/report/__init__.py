"""Views of the history: Prometheus metrics (textfile, exporter) and the HTML report."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.report.metrics import registry_for, render, write_textfile
    from vmtrim.report.state import disk_states

__all__ = [
    "disk_states",
    "registry_for",
    "render",
    "write_textfile",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "registry_for": "vmtrim.report.metrics",
        "render": "vmtrim.report.metrics",
        "write_textfile": "vmtrim.report.metrics",
        "disk_states": "vmtrim.report.state",
    },
)
