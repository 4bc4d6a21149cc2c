"""QEMU without libvirt: a guest-agent socket (``--qga``) and optionally a QMP socket (``--qmp``).

The agent trims; QMP names the disks (``query-block``: the device, its node and the
image file, which we measure with ``du``) and counts the discards that really
reached QEMU's block layer (``query-blockstats`` ``unmap_bytes``/``unmap_operations``,
QEMU >= 4.2). Both sockets use the qemu.qmp clients in :mod:`vmtrim.channels.qmp`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from vmtrim.channels.qmp import SyncGuestAgent, SyncMonitor
from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.image.allocation import allocated_bytes
from vmtrim.trim.engine import DiskRef


def _socket(path: str, option: str) -> str:
    if not os.path.exists(path):
        raise BadInput(f"no such socket (given with {option})", subject=path)
    return path


def qmp_execute(qmp: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    with SyncMonitor(qmp, timeout=10.0, subject=qmp) as monitor:
        return monitor.execute(command, arguments)


def _local_image(inserted: dict[str, Any]) -> str | None:
    image = inserted.get("image")
    name = image.get("filename") if isinstance(image, dict) else inserted.get("file")
    if isinstance(name, str) and name.startswith("/") and os.path.isfile(name):
        return name
    return None


def block_disks(query_block: Any) -> list[DiskRef]:
    """query-block -> the writable disks with media, named as a user would look for them."""
    refs = []
    for entry in query_block if isinstance(query_block, list) else []:
        inserted = entry.get("inserted") if isinstance(entry, dict) else None
        if not isinstance(inserted, dict) or inserted.get("ro"):
            continue
        qdev, device = entry.get("qdev") or "", entry.get("device") or ""
        name = device or inserted.get("node-name") or qdev
        local = _local_image(inserted)
        refs.append(
            DiskRef(
                target=str(name),
                source=local or str(inserted.get("file")),
                local_file=local,
                key=str(qdev or device),
            )
        )
    return refs


def unmap_counters(query_blockstats: Any) -> dict[str, tuple[int, int]]:
    counters = {}
    for entry in query_blockstats if isinstance(query_blockstats, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
            continue
        key = str(entry.get("qdev") or entry.get("device") or "")
        stats = entry["stats"]
        counters[key] = (int(stats.get("unmap_bytes", 0)), int(stats.get("unmap_operations", 0)))
    return counters


class QemuTarget:
    """One QEMU process reached through its sockets."""

    def __init__(self, qga: str, qmp: str | None) -> None:
        self.qga = _socket(qga, "--qga")
        self.qmp = _socket(qmp, "--qmp") if qmp else None
        self.name = qga
        self._session: SyncGuestAgent | None = None
        if self.qmp:
            named = qmp_execute(self.qmp, "query-name")
            if isinstance(named, dict) and named.get("name"):
                self.name = str(named["name"])

    @classmethod
    @contextmanager
    def open(cls, qga: str, qmp: str | None) -> Iterator[QemuTarget]:
        target = cls(qga, qmp)
        try:
            yield target
        finally:
            target.close()

    def close(self) -> None:
        if self._session is not None:
            # After an abandoned (timed-out) call its event loop is still busy in that
            # thread and cannot be closed from here; the process exit reclaims it.
            with suppress(RuntimeError):
                self._session.__exit__(None, None, None)
            self._session = None

    def skip_reason(self) -> str | None:
        return None

    def disks(self) -> list[DiskRef]:
        return block_disks(qmp_execute(self.qmp, "query-block")) if self.qmp else []

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        if disk.local_file is None:
            raise EnvironmentProblem(
                "not a local file: no host measurement without libvirt",
                subject=disk.source or disk.target,
            )
        return allocated_bytes(disk.local_file), "du"

    def agent(self, timeout: float) -> SyncGuestAgent:
        session = SyncGuestAgent(self.qga, timeout=timeout, subject=self.qga)
        session.__enter__()  # connect and guest-sync
        self._session = session
        return session

    def unmap_counters(self) -> dict[str, tuple[int, int]] | None:
        return unmap_counters(qmp_execute(self.qmp, "query-blockstats")) if self.qmp else None
