"""Audit a running QEMU through its QMP socket (``vmtrim audit --qmp SOCKET``).

QMP shows what QEMU runs now: the exact version, the machine type, every guest
device (hot-plugged ones too), its block node graph, format, detect_zeroes, cache
mode and read-only state, and QOM device properties such as virtio-blk's
``discard``. It does **not** show a node's ``discard`` option: on QEMU 7.2
``query-block``, ``query-named-block-nodes`` and ``x-debug-query-block-graph``
leave it out. So the configured discard comes from the command line:

1. connect to the unix socket ourselves and ask the kernel who is listening
   (``SO_PEERCRED``): that is QEMU's PID;
2. read ``/proc/PID/cmdline`` with :func:`vmtrim.sources.qemu_args.read_pid` (``--pid``);
3. lay the live node graph over the configured one: a live node that matches a
   configured node (same place in the graph, driver and file) takes its discard
   setting; any other node (hot-plugged, or created at runtime by a snapshot or
   block job) has discard ``unknown``, with the reason.

When the peer is not a QEMU whose command line we can read (a forwarded socket,
another PID namespace, no permission), the audit is QMP-only and says so.

Errors: a missing path, a path that is not a socket, or a socket that does not
speak QMP is bad input (exit 2); a refused connection or no answer in time is an
environment problem (exit 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import QMPError

from vmtrim._util.versions import Version, format_version
from vmtrim.channels.qmp import Monitor, parse_query_block
from vmtrim.errors import (
    AgentCommandFailed,
    AgentUnavailable,
    BadInput,
    EnvironmentProblem,
    VmtrimError,
)
from vmtrim.facts import CONTROLLERS, DEVICES, FACTS
from vmtrim.model import (
    BlockNode,
    DeviceType,
    Disk,
    Domain,
    MachineType,
    NodeOrigin,
    Origin,
    QomDevice,
    StorageKind,
)
from vmtrim.sources.qemu_args import fill_disk_from_nodes, read_pid

NOT_SHOWN = "QMP does not show discard"
_MAX_DEPTH = 64
_DEVICE_PROPERTIES = ("discard", "discard_granularity")  # device properties the audit reads


# ---------------------------------------------------------------- connecting


def _check_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise BadInput("no such socket (given with --qmp)", subject=path) from exc
    except OSError as exc:
        raise EnvironmentProblem(f"cannot stat: {exc.strerror}", subject=path) from exc
    if not stat.S_ISSOCK(mode):
        raise BadInput("not a socket (--qmp wants QEMU's QMP unix socket)", subject=path)


def connect(path: str, timeout: float) -> tuple[socket.socket, int | None]:
    """Connect to ``path``, take the listener's PID from SO_PEERCRED, check the greeting.

    The greeting is only peeked at, so the qemu.qmp client reads it again. Returns the
    connected socket and the PID (None when the kernel cannot name it here).
    """
    _check_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except ConnectionRefusedError as exc:
            raise EnvironmentProblem(
                "connection refused (no QEMU is listening; a stale socket?)", subject=path
            ) from exc
        except TimeoutError as exc:
            raise EnvironmentProblem(f"no connection within {timeout:g} s", subject=path) from exc
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot connect: {exc.strerror or exc}", subject=path
            ) from exc
        pid = _peer_pid(sock)
        expect_greeting(sock, path, timeout)
        sock.setblocking(False)
        return sock, pid
    except BaseException:
        sock.close()
        raise


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", raw)[0])
    return pid or None  # 0: the listener lives in a PID namespace we cannot see


def expect_greeting(sock: socket.socket, path: str, timeout: float) -> None:
    """Check, without consuming it, that the peer greets like QMP (``{"QMP": ...}``)."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        if _answers_like_agent(sock):
            raise BadInput(
                "a guest agent socket, not QMP (give it to `vmtrim trim --qga`)", subject=path
            )
        raise EnvironmentProblem(
            f"no QMP greeting within {timeout:g} s (is another client holding the monitor?)",
            subject=path,
        )
    try:
        head = sock.recv(4096, socket.MSG_PEEK)
    except OSError as exc:
        raise EnvironmentProblem(f"connection lost: {exc.strerror or exc}", subject=path) from exc
    if not head:
        raise BadInput("not a QMP socket (it hung up without a greeting)", subject=path)
    line = head.split(b"\n", 1)[0].strip()
    try:
        greeting = json.loads(line)
    except ValueError:
        greeting = None
    whole = isinstance(greeting, dict) and "QMP" in greeting
    if not (whole or (b"\n" not in head and line.startswith(b'{"QMP"'))):  # a partial line
        shown = head.strip()[:40].decode("utf-8", "replace")
        raise BadInput(f"not a QMP socket (it said {shown!r})", subject=path)


def _answers_like_agent(sock: socket.socket) -> bool:
    """A silent socket may be qemu-ga's, which waits for a command; a busy QMP monitor
    answers nothing either. qemu-ga answers guest-ping at once."""
    try:
        sock.sendall(b'{"execute":"guest-ping"}\n')
        readable, _, _ = select.select([sock], [], [], 1.0)
        reply = sock.recv(4096, socket.MSG_PEEK) if readable else b""
    except OSError:
        return False
    return reply.lstrip().startswith(b'{"return"')


# ---------------------------------------------------------------- gathering (I/O)


class _SocketMonitor(Monitor):
    """A :class:`vmtrim.channels.qmp.Monitor` on a socket we connected (for SO_PEERCRED)."""

    def __init__(
        self, sock: socket.socket, path: str, timeout: float, deadline: float | None = None
    ) -> None:
        super().__init__(path, timeout=timeout, subject=path, deadline=deadline)
        self._sock = sock

    async def _connect(self) -> None:
        try:
            await asyncio.wait_for(self._client.connect(self._sock), self._limit())
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            if self._client.rejected:
                raise self._lost("the QMP greeting", exc) from exc
            raise self._unavailable("QMP handshake failed", exc) from exc

    async def optional(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """``command``'s answer, or None when QEMU says it has no such command/property.

        A reply that was refused (too long, too deep) is not "no such command": it raises.
        """
        try:
            return await self.execute(command, arguments)
        except AgentCommandFailed as exc:
            if exc.error_class is None:
                raise
            return None


def device_path(qdev: str) -> str:
    """query-block's ``qdev`` -> the QOM path of the device the guest sees.

    A device with an id is named by its id; others by QOM path. virtio devices name
    their ``virtio-backend`` child; the guest-visible device is its parent (the proxy).
    """
    path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
    head, _, tail = path.rpartition("/")
    return head if tail == "virtio-backend" and head else path


async def _gather(monitor: _SocketMonitor) -> dict[str, Any]:
    """Every QMP answer the audit uses, as raw JSON (parsed by :func:`parse_live`)."""
    raw: dict[str, Any] = {
        "version": await monitor.execute("query-version"),
        "machine": await monitor.optional("qom-get", {"path": "/machine", "property": "type"}),
        "name": await monitor.optional("query-name"),
        "block": await monitor.execute("query-block"),
        "nodes": await monitor.execute("query-named-block-nodes", {"flat": True}),
        "graph": await monitor.optional("x-debug-query-block-graph"),
        "qom": {},
    }
    for dev in parse_query_block(raw["block"]):
        path = device_path(dev.qdev) if dev.qdev else None
        if path and path not in raw["qom"]:
            raw["qom"][path] = await _device_facts(monitor, path)
    return raw


async def _device_facts(monitor: _SocketMonitor, path: str) -> dict[str, Any]:
    async def get(where: str, name: str) -> Any:
        return await monitor.optional("qom-get", {"path": where, "property": name})

    listed = await monitor.optional("qom-list", {"path": path})
    names = {p.get("name") for p in _dicts(listed)}  # properties this device type has
    facts: dict[str, Any] = {
        "type": await get(path, "type"),
        "hotplugged": await get(path, "hotplugged"),
    }
    for name in _DEVICE_PROPERTIES:
        if name in names:
            facts[name] = await get(path, name)
    bus = await get(path, "parent_bus")
    if isinstance(bus, str) and "/" in bus:
        facts["controller"] = await get(bus.rpartition("/")[0], "type")
    return facts


def query(
    sock: socket.socket, path: str, timeout: float, deadline: float | None = None
) -> dict[str, Any]:
    """Every answer :func:`parse_live` needs; ``deadline`` (monotonic) bounds them all.

    The number of QOM calls grows with the devices QEMU lists, so a per-call limit
    alone would let a hostile or very slow QEMU hold the audit for ever.
    """
    deadline = deadline if deadline is not None else time.monotonic() + timeout

    async def run() -> dict[str, Any]:
        async with _SocketMonitor(sock, path, timeout, deadline) as monitor:
            return await _gather(monitor)

    async def bounded() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(run(), max(0.01, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise AgentUnavailable(
                f"QMP did not answer every query within {timeout:g} s", subject=path
            ) from exc

    return asyncio.run(bounded())


# ---------------------------------------------------------------- parsing (pure)


@dataclass
class LiveDevice:
    """A guest device with a block backend, as QMP and QOM show it now."""

    backend: str  # the BlockBackend name: the -drive id; "" for a -blockdev node
    path: str  # QOM path of the guest-visible device
    qemu_device: str | None
    hotplugged: bool | None
    controller: str | None  # QOM type of the controller its bus hangs off
    properties: dict[str, Any]
    top: BlockNode | None  # None: no medium

    @property
    def id(self) -> str | None:
        prefix = "/machine/peripheral/"
        rest = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
        return rest if rest and "/" not in rest else None

    def names(self) -> set[tuple[str, str]]:
        """(namespace, name) pairs by which a command-line disk may name this device."""
        top = self.top.node_name if self.top else None
        return {
            (kind, name)
            for kind, name in (("id", self.id), ("backend", self.backend), ("node", top))
            if name
        }

    @property
    def ident(self) -> str:
        return self.id or self.backend or (self.top.node_name if self.top else None) or self.path


@dataclass
class LiveQemu:
    """What QMP says about one QEMU process."""

    name: str | None
    version: Version | None
    machine: str | None
    devices: list[LiveDevice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_live(raw: dict[str, Any]) -> LiveQemu:
    """Turn :func:`_gather`'s answers into a :class:`LiveQemu`; tolerates missing parts."""
    version = raw.get("version")
    qemu = version.get("qemu") if isinstance(version, dict) else None
    parts = [qemu.get(k) for k in ("major", "minor", "micro")] if isinstance(qemu, dict) else []
    numbers = [p for p in parts if isinstance(p, int) and not isinstance(p, bool)]
    machine = raw.get("machine")
    named = raw.get("name")
    live = LiveQemu(
        name=str(named["name"]) if isinstance(named, dict) and named.get("name") else None,
        version=tuple(numbers) if len(numbers) == 3 else None,
        machine=machine.removesuffix("-machine") if isinstance(machine, str) else None,
    )
    infos = {str(n["node-name"]): n for n in _dicts(raw.get("nodes")) if n.get("node-name")}
    children = _graph_children(raw.get("graph"))
    if children is None:
        live.notes.append(
            "x-debug-query-block-graph is not available: only each disk's top node is shown"
        )
    qom = raw.get("qom")
    qom = qom if isinstance(qom, dict) else {}
    seen: set[str] = set()  # block nodes already expanded, across every device
    for dev in parse_query_block(raw.get("block")):
        qdev, backend = dev.qdev, dev.device
        if not qdev:
            live.notes.append(f"block backend {backend or '?'} has no guest device")
            continue
        path = device_path(qdev)
        found = qom.get(path)
        facts: dict[str, Any] = found if isinstance(found, dict) else {}
        top = None
        if dev.inserted is not None:
            top = _tree(dev.node_name, infos, children or {}, seen, dev.inserted)
        kind = facts.get("type")
        live.devices.append(
            LiveDevice(
                backend=backend,
                path=path,
                qemu_device=kind if isinstance(kind, str) else None,
                hotplugged=facts.get("hotplugged")
                if isinstance(facts.get("hotplugged"), bool)
                else None,
                controller=facts["controller"]
                if isinstance(facts.get("controller"), str)
                else None,
                properties={k: facts[k] for k in _DEVICE_PROPERTIES if k in facts},
                top=top,
            )
        )
    return live


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _graph_children(graph: Any) -> dict[str, dict[str, str]] | None:
    """x-debug-query-block-graph -> {node-name: {"file": child, "backing": child}}."""
    if not isinstance(graph, dict):
        return None
    names = {
        n.get("id"): n.get("name")
        for n in _dicts(graph.get("nodes"))
        if n.get("type") == "block-driver"
    }
    children: dict[str, dict[str, str]] = {}
    for edge in _dicts(graph.get("edges")):
        parent, child = names.get(edge.get("parent")), names.get(edge.get("child"))
        if (
            isinstance(parent, str)
            and isinstance(child, str)
            and edge.get("name") in ("file", "backing")
        ):
            children.setdefault(parent, {})[str(edge["name"])] = child
    return children


def _cache_mode(cache: Any) -> str | None:
    """QMP's cache flags -> the -drive cache= name."""
    if not isinstance(cache, dict):
        return None
    if cache.get("no-flush"):
        return "unsafe"
    direct, writeback = bool(cache.get("direct")), bool(cache.get("writeback"))
    return {
        (True, True): "none",
        (True, False): "directsync",
        (False, True): "writeback",
        (False, False): "writethrough",
    }[(direct, writeback)]


def _tree(
    name: str,
    infos: dict[str, dict[str, Any]],
    children: dict[str, dict[str, str]],
    seen: set[str],
    fallback: dict[str, Any] | None = None,
    depth: int = 0,
) -> BlockNode:
    """The node ``name`` and what hangs below it.

    Each node's children are followed once per parse (``seen``), and no deeper than
    _MAX_DEPTH: a hostile graph whose nodes point at each other would otherwise
    double at every level. A node met again is a leaf.
    """
    info = infos.get(name) or fallback or {}
    detect = info.get("detect_zeroes")
    node = BlockNode(
        str(info["drv"]) if isinstance(info.get("drv"), str) else None,
        node_name=name or None,
        detect_zeroes=detect if isinstance(detect, str) else None,
        cache=_cache_mode(info.get("cache")),
        read_only=bool(info.get("ro")),
        filename=str(info["file"]) if isinstance(info.get("file"), str) else None,
        defined_by=NodeOrigin("qmp", name) if name else None,
        discard_unknown=NOT_SHOWN,
    )
    if depth < _MAX_DEPTH and name and name not in seen:
        seen.add(name)
        for role, child in children.get(name, {}).items():
            setattr(node, role, _tree(child, infos, children, seen, None, depth + 1))
    return node


# ---------------------------------------------------------------- merging


def build_domain(
    live: LiveQemu, configured: Domain | None, subject: str, unreadable: str | None = None
) -> Domain:
    """One :class:`Domain`: the live devices, with discard from ``configured`` where known.

    ``unreadable`` says why there is no command line (``configured`` is None).
    """
    base = configured
    domain = Domain(
        name=live.name or (base.name if base else subject),
        origin=Origin.QEMU_ARGS,
        machine=live.machine or (base.machine if base else None),
        qemu_version=live.version or (base.qemu_version if base else None),
        notes=[
            f"QMP {subject}: QEMU {format_version(live.version)}, machine"
            f" {live.machine or 'unknown'}"
        ],
    )
    if base is None:
        domain.notes.append(f"QMP-only: {unreadable}; discard is unknown on every disk")
    pending = list(base.disks) if base else []
    for device in live.devices:
        match = next((d for d in pending if device.names() & _disk_names(d)), None)
        if match is not None:
            pending.remove(match)
            domain.disks.append(_merged(domain, device, match))
            continue
        if device.qemu_device not in DEVICES:
            domain.notes.append(
                f"{device.ident}: {device.qemu_device or 'unknown device'} is"
                " not a disk vmtrim audits"
            )
            continue
        how = "hot-plugged" if device.hotplugged else "not found in it"
        why = (
            f"{NOT_SHOWN}, and {device.ident} is not on the command line ({how})"
            if base
            else f"{NOT_SHOWN}, and the command line is not readable"
        )
        domain.disks.append(_live_only(domain, device, why))
    order = {id(disk): index for index, disk in enumerate(base.disks if base else [])}
    domain.disks.sort(key=lambda disk: order.get(id(disk), len(order)))  # command-line order
    for disk in pending:
        if disk.storage is not StorageKind.NONE or disk.node is not None:
            domain.notes.append(
                f"{disk.ident} is on the command line but QEMU no longer has it (unplugged)"
            )
    if base:
        domain.notes.extend(base.notes)
    return domain


def _disk_names(disk: Disk) -> set[tuple[str, str]]:
    """The names of a command-line disk, each in its QEMU namespace (device ids, drive
    ids and node names may repeat across namespaces)."""
    names = set()
    if disk.device_properties.get("id"):
        names.add(("id", str(disk.device_properties["id"])))
    if disk.node is not None:
        if disk.node.node_name:
            names.add(("node", disk.node.node_name))
        origin = disk.node.defined_by
        if origin is not None and origin.kind == "-drive" and origin.name:
            names.add(("backend", origin.name))
    return names


def _merged(domain: Domain, device: LiveDevice, disk: Disk) -> Disk:
    """The command-line ``disk`` brought up to date with what QMP shows for it."""
    disk.domain = domain.name
    if device.qemu_device in DEVICES:
        disk.qemu_device = device.qemu_device
    _virtio_discard(domain, device, disk)
    if device.top is not None:
        reason = (
            f"{NOT_SHOWN}, and this node is not on the command line (created at"
            " runtime, e.g. by a snapshot or block job)"
        )
        _overlay_disk(device.top, disk.node, reason)
        fill_disk_from_nodes(disk, device.top)
        _mark_unknown(disk)
    return disk


def _live_only(domain: Domain, device: LiveDevice, why: str) -> Disk:
    kind = str(device.qemu_device)
    rule = DEVICES[kind]
    bus, controller_model = rule.bus, None
    if device.controller in CONTROLLERS:
        kind_bus, controller_model = CONTROLLERS[device.controller]
        if kind_bus in ("sata", "ide", "scsi"):
            bus = kind_bus
    disk = Disk(
        domain=domain.name,
        ident=device.ident,
        device=rule.device,
        bus=bus,
        controller_model=controller_model,
        qemu_device=kind,
        storage=StorageKind.NONE,
        locator=QomDevice(device.path),
        read_only=rule.device is DeviceType.CDROM,
    )
    _virtio_discard(domain, device, disk)
    if device.top is not None:
        _overlay(device.top, None, why, 0)
        fill_disk_from_nodes(disk, device.top)
        _mark_unknown(disk)
    return disk


def _overlay_disk(top: BlockNode, conf: BlockNode | None, reason: str) -> None:
    """:func:`_overlay`, and when a runtime snapshot put new nodes over the configured
    top, find the configured top further down the live backing chain."""
    if _overlay(top, conf, reason, 0) or conf is None:
        return
    node, depth = top.backing, 0
    while node is not None and depth < _MAX_DEPTH:
        if _same_node(node, conf):
            _overlay(node, conf, reason, 0)
            return
        node, depth = node.backing, depth + 1


def _overlay(live: BlockNode, conf: BlockNode | None, reason: str, depth: int) -> bool:
    """Give ``live`` (and its children, position by position) the discard of ``conf``.

    Returns whether ``live`` matched ``conf``.
    """
    matched = conf is not None and _same_node(live, conf)
    if conf is not None and matched:
        live.discard, live.inherited = conf.discard, conf.inherited
        live.discard_no_unref = conf.discard_no_unref
        live.defined_by, live.options = conf.defined_by, dict(conf.options)
        live.discard_unknown = None
    else:
        conf = None
        live.discard_unknown = reason
        if live.detect_zeroes == "unmap":
            # QEMU refuses detect-zeroes=unmap on a node without discard=unmap ("setting
            # detect-zeroes to unmap is not allowed without setting discard operation to
            # unmap"; blockdev-add on QEMU 7.2), so this node has discard=unmap.
            live.discard, live.discard_unknown = "unmap", None
    if depth >= _MAX_DEPTH:
        return matched
    for role in ("file", "backing"):
        child = getattr(live, role)
        if child is None:
            continue
        below = getattr(conf, role) if conf else None
        why = reason
        if conf is not None and below is None and role == "backing":
            why = f"{NOT_SHOWN} (a backing file QEMU opened from the image header)"
        _overlay(child, below, why, depth + 1)
    return matched


def _same_node(live: BlockNode, conf: BlockNode) -> bool:
    def norm(path: str | None) -> str | None:
        return os.path.normpath(path) if path else None

    return (
        (conf.node_name is None or conf.node_name == live.node_name)
        and (conf.driver is None or conf.driver == live.driver)
        and (
            norm(conf.filename) is None
            or norm(live.filename) is None
            or norm(conf.filename) == norm(live.filename)
        )
    )


def _mark_unknown(disk: Disk) -> None:
    if disk.node is not None and disk.node.discard_unknown:
        disk.discard = "unknown"


def _virtio_discard(domain: Domain, device: LiveDevice, disk: Disk) -> None:
    """Use the live virtio-blk ``discard`` (and a zero discard_granularity) property.

    The audit infers virtio-blk discard from the machine type; the live value is set
    as a device property only where it says otherwise (an explicit discard=on/off, or
    a -global), so a pre-4.0 machine type is still named as the cause.
    """
    props = device.properties
    if props.get("discard_granularity") == 0:
        disk.device_properties["discard_granularity"] = 0
    live = props.get("discard")
    rule = DEVICES.get(str(disk.qemu_device))
    if not isinstance(live, bool) or rule is None or rule.bus != "virtio":
        return
    need = FACTS["virtio_blk_discard"].machine or (4, 0)
    version = MachineType.parse(domain.machine).version if domain.machine else None
    inferred = None if version is None else version >= need
    if live != inferred:
        disk.device_properties["discard"] = "on" if live else "off"


# ---------------------------------------------------------------- the whole audit input


def read_qmp(path: str, timeout: float = 10.0) -> Domain:
    """The :class:`Domain` of the QEMU behind the QMP socket ``path``."""
    deadline = time.monotonic() + timeout
    sock, pid = connect(path, timeout)
    try:
        raw = query(sock, path, timeout, deadline)
    finally:
        sock.close()
    live = parse_live(raw)
    configured, unreadable = _command_line(pid)
    return build_domain(live, configured, path, unreadable)


def _command_line(pid: int | None) -> tuple[Domain | None, str | None]:
    if pid is None:
        return None, (
            "SO_PEERCRED names no process here (a forwarded socket, or another PID namespace)"
        )
    try:
        domain = read_pid(pid)
    except VmtrimError as exc:
        return None, f"the socket's peer is pid {pid}, but {exc.message}"
    domain.notes.insert(0, f"discard settings from /proc/{pid}/cmdline (pid from SO_PEERCRED)")
    return domain, None
