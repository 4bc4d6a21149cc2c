"""QEMU without libvirt: a guest-agent socket (``--qga``) and optionally a QMP socket (``--qmp``).

The agent trims; QMP names the disks (``query-block``: the device, its node and the
image file, which we measure with ``du``) and counts the discards that really
reached QEMU's block layer (``query-blockstats`` ``unmap_bytes``/``unmap_operations``,
QEMU >= 4.2). Both sockets use the qemu.qmp clients in :mod:`vmtrim.channels.qmp`.
Every QMP call is limited by the run's ``timeout`` (the engine bounds the run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from vmtrim.channels.qmp import (
    SyncGuestAgent,
    SyncMonitor,
    parse_blockstats,
    parse_query_block,
)
from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.image.allocation import allocated_bytes
from vmtrim.storage.pool import PoolUsage
from vmtrim.trim.engine import Blocker, DiskRef, blocking_layers
from vmtrim.trim.explain import DiskFacts, Evidence, image_facts, punch_facts


def _socket(path: str, option: str) -> str:
    if not os.path.exists(path):
        raise BadInput(f"no such socket (given with {option})", subject=path)
    return path


def qmp_execute(
    qmp: str, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 10.0
) -> Any:
    with SyncMonitor(qmp, timeout=timeout, subject=qmp) as monitor:
        return monitor.execute(command, arguments)


def block_disks(query_block: Any) -> list[DiskRef]:
    """query-block -> the writable disks with media, named as a user would look for them."""
    refs = []
    for dev in parse_query_block(query_block):
        if dev.inserted is None or dev.read_only:
            continue
        name = dev.device or dev.node_name or dev.qdev
        path = dev.filename
        local = path if path and path.startswith("/") and os.path.isfile(path) else None
        refs.append(
            DiskRef(
                target=name,
                source=local or str(dev.inserted.get("file")),
                local_file=local,
                key=dev.qdev or dev.device,
            )
        )
    return refs


def unmap_counters(query_blockstats: Any, subject: str | None = None) -> dict[str, tuple[int, int]]:
    return {
        s.key: (s.unmap_bytes, s.unmap_operations)
        for s in parse_blockstats(query_blockstats, subject)
    }


class QemuTarget:
    """One QEMU process reached through its sockets."""

    def __init__(self, qga: str, qmp: str | None, *, timeout: float = 10.0) -> None:
        self.qga = _socket(qga, "--qga")
        self.qmp = _socket(qmp, "--qmp") if qmp else None
        self.timeout = timeout
        self.name = qga  # QEMU's -name, once QMP has said it (in skip_reason)
        self._session: SyncGuestAgent | None = None

    @classmethod
    @contextmanager
    def open(cls, qga: str, qmp: str | None, *, timeout: float = 10.0) -> Iterator[QemuTarget]:
        target = cls(qga, qmp, timeout=timeout)
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

    def _qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None
        return qmp_execute(self.qmp, command, arguments, timeout=self.timeout)

    def skip_reason(self) -> str | None:
        if self.qmp:  # the first call of the run: learn QEMU's -name, within its deadline
            named = self._qmp("query-name")
            if isinstance(named, dict) and isinstance(named.get("name"), str) and named["name"]:
                self.name = named["name"]
        return None

    def disks(self) -> list[DiskRef]:
        return block_disks(self._qmp("query-block")) if self.qmp else []

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        if disk.local_file is None:
            raise EnvironmentProblem(
                "not a local file: no host measurement without libvirt",
                subject=disk.source or disk.target,
            )
        return allocated_bytes(disk.local_file), "du"

    def agent(self, timeout: float) -> SyncGuestAgent:
        if self._session is not None:  # guest-get-osinfo opened it already
            return self._session
        session = SyncGuestAgent(self.qga, timeout=timeout, subject=self.qga)
        session.__enter__()  # connect and guest-sync
        self._session = session
        return session

    def os_id(self, timeout: float) -> str | None:
        value = self.agent(timeout).get_osinfo().get("id")
        return value[:64] if isinstance(value, str) else None

    def pool_usage(self, disk: DiskRef) -> PoolUsage | None:
        from vmtrim.storage.pool import pool_under

        return pool_under(disk.local_file) if disk.local_file else None

    def evidence(self, timeout: float) -> Evidence:
        """The images' headers and their host filesystems; QMP's device names do not map
        onto the guest's filesystems, so the domain's totals decide which disks fell short."""
        evidence = Evidence()
        files = {ref.target: ref.local_file for ref in self.disks()}
        for target in files:
            evidence.disks[target] = DiskFacts(target)

        def fill(targets: set[str]) -> None:
            for target in sorted(targets):
                path = files.pop(target, None)
                if path:
                    facts = evidence.disks[target]
                    facts.image, facts.image_error = image_facts(path)
                    facts.punch = punch_facts(path)

        evidence.fill = fill
        return evidence

    def unmap_counters(self) -> dict[str, tuple[int, int]] | None:
        return unmap_counters(self._qmp("query-blockstats"), self.qmp) if self.qmp else None

    def blockers(self) -> list[Blocker]:
        """``vmtrim audit --qmp`` on this QEMU (live graph and its command line)."""
        if not self.qmp:
            return []
        from vmtrim.audit.engine import audit_domain
        from vmtrim.audit.hostprobe import HostProbes
        from vmtrim.sources.qmp import read_qmp

        domain = read_qmp(self.qmp, self.timeout)
        return blocking_layers(
            audit_domain(domain, HostProbes()), "vmtrim fix --qemu-args FILE (its command line)"
        )
