"""The history database: what every run, trim and verify got back, per domain and disk."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.history.query import DomainSummary, domain_summaries, last_run
    from vmtrim.history.store import DiskRecord, DomainRecord, History, default_db_path

__all__ = [
    "DiskRecord",
    "DomainRecord",
    "DomainSummary",
    "History",
    "default_db_path",
    "domain_summaries",
    "last_run",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "DiskRecord": "vmtrim.history.store",
        "DomainRecord": "vmtrim.history.store",
        "History": "vmtrim.history.store",
        "default_db_path": "vmtrim.history.store",
        "DomainSummary": "vmtrim.history.query",
        "domain_summaries": "vmtrim.history.query",
        "last_run": "vmtrim.history.query",
    },
)
