"""Prometheus metrics from the history database, for a textfile or the exporter.

Names follow Prometheus' conventions (base units, ``_bytes``/``_seconds``, ``_total`` on
counters). Every scrape reads only the history database: it never talks to a guest or
to libvirt. A missing, corrupt or locked database is ``vmtrim_history_up 0``, not an
error, so a broken history shows on a dashboard instead of as a failed scrape.

Gauges, per ``{host, domain, target, source}`` (the latest result of the disk):
``vmtrim_disk_allocated_bytes``, ``vmtrim_disk_virtual_bytes``,
``vmtrim_disk_guest_used_bytes``, ``vmtrim_disk_reclaimable_bytes`` (the estimate),
and ``vmtrim_disk_discard_path{..., verdict, layer} 1``. Per run kind:
``vmtrim_last_run_timestamp_seconds`` and ``vmtrim_run_duration_seconds``.
Counters: ``vmtrim_disk_reclaimed_bytes_total`` per disk and
``vmtrim_domain_trims_total{host, domain, status}``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmtrim._util.files import atomic_write
from vmtrim.errors import EnvironmentProblem, HistoryUnavailable
from vmtrim.history.store import History, default_db_path
from vmtrim.report.state import disk_states, last_runs, trim_counts

DISK_LABELS = ["host", "domain", "target", "source"]
TEXTFILE_NAME = "vmtrim.prom"


class HistoryCollector(Collector):
    """Collects the metrics above from the database at ``path``.

    The database changes only when a run records, while Prometheus scrapes every few
    seconds; so the families are kept until the database file or its WAL changes (inode,
    size, mtime), and a scrape between runs costs a stat() of two files.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self._lock = threading.Lock()
        self._cached: tuple[object, list[Metric]] | None = None

    def _fingerprint(self) -> object:
        marks: list[tuple[int, int, int] | None] = []
        for file in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                st = file.stat()
            except OSError:
                marks.append(None)
                continue
            marks.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(marks)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            mark = self._fingerprint()
            if self._cached is None or self._cached[0] != mark:
                self._cached = (mark, self._read())
            families = self._cached[1]
        yield from families

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "vmtrim_history_up", "1 when the history database could be read, else 0"
        )
        try:
            with History.open(self.path, create=False) as history:
                families = list(_families(history))
        except HistoryUnavailable:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]


def _families(history: History) -> Iterator[Metric]:
    gauges = {
        name: GaugeMetricFamily(f"vmtrim_disk_{name}_bytes", text, labels=DISK_LABELS)
        for name, text in (
            ("allocated", "host allocation of the disk at its latest result"),
            ("virtual", "the disk's size as the guest sees it"),
            ("guest_used", "bytes the guest's filesystems on this disk use"),
            ("reclaimable", "estimate of what a trim could still give back"),
        )
    }
    path = GaugeMetricFamily(
        "vmtrim_disk_discard_path",
        "1 for the disk's current audit verdict and the layer that blocks, if any",
        labels=[*DISK_LABELS, "verdict", "layer"],
    )
    reclaimed = CounterMetricFamily(
        "vmtrim_disk_reclaimed_bytes",
        "bytes the host got back from this disk's trims",
        labels=DISK_LABELS,
    )
    for disk in disk_states(history):
        labels = [disk.host, disk.domain, disk.target, disk.source]
        for name, value in (
            ("allocated", disk.allocated),
            ("virtual", disk.virtual),
            ("guest_used", disk.guest_used),
            ("reclaimable", disk.reclaimable),
        ):
            if value is not None:
                gauges[name].add_metric(labels, value)
        if disk.verdict is not None:
            path.add_metric([*labels, disk.verdict, disk.layer or ""], 1)
        reclaimed.add_metric(labels, disk.reclaimed_total)
    trims = CounterMetricFamily(
        "vmtrim_domain_trims", "domain results by status", labels=["host", "domain", "status"]
    )
    for count in trim_counts(history):
        trims.add_metric([count.host, count.domain, count.status], count.count)
    last = GaugeMetricFamily(
        "vmtrim_last_run_timestamp_seconds",
        "when the last run of each kind started",
        labels=["kind"],
    )
    duration = GaugeMetricFamily(
        "vmtrim_run_duration_seconds",
        "how long the last finished run of each kind took",
        labels=["kind"],
    )
    for run in last_runs(history):
        last.add_metric([run.kind], run.started)
        if run.ended is not None:
            duration.add_metric([run.kind], run.ended - run.started)
    yield from (*gauges.values(), path, reclaimed, trims, last, duration)


def registry_for(path: str | os.PathLike[str] | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HistoryCollector(path))
    return registry


def render(path: str | os.PathLike[str] | None) -> bytes:
    """The text exposition format of the metrics, as a scrape would get it."""
    return generate_latest(registry_for(path))


def write_textfile(where: str | os.PathLike[str], db: str | os.PathLike[str] | None) -> Path:
    """Write the metrics atomically for node_exporter's textfile collector.

    ``where`` is the collector's directory (the file is ``DIR/vmtrim.prom``) or a path
    ending in ``.prom``. Raises EnvironmentProblem when it cannot be written.
    """
    target = Path(where)
    if target.suffix != ".prom":
        target = target / TEXTFILE_NAME
    try:
        atomic_write(target, render(db), new_file_mode=0o644)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write the metrics: {exc.strerror}", str(target)) from exc
    return target
