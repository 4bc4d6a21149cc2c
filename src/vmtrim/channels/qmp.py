"""Typed clients for QEMU's QMP-protocol sockets: the guest agent, and the monitor.

Both are :class:`qemu.qmp.QMPClient` (QEMU's own client, pinned <0.1). The guest
agent speaks QMP without a greeting or capability negotiation, and a reply to a
command the previous client gave up on may still be in the channel, so a session
starts with ``guest-sync`` and a random id, repeated until that id comes back.

::

    async with GuestAgent("/run/qga.sock", timeout=10) as ga:
        result = await ga.fstrim(minimum=0)      # FstrimResult, one entry per path

    with SyncGuestAgent("/run/qga.sock", timeout=10) as ga:   # the same, blocking
        ga.ping()

Every call has a time limit. No socket, no answer in time or a lost connection is
:class:`~vmtrim.errors.AgentUnavailable`; an error reply, or a reply that is not what
the command returns, is :class:`~vmtrim.errors.AgentCommandFailed` with the command
and QMP's error class. Both name the socket as subject.

The guest (and whoever runs the QEMU) is hostile: a reply line longer than
:data:`MAX_REPLY_BYTES`, a number with more digits than any QMP integer has, JSON
nested deeper than Python's parser recurses, or a number outside its QAPI range is
:class:`~vmtrim.errors.AgentCommandFailed` naming the command and what was wrong,
never an internal error, and memory stays bounded by the cap.

:func:`parse_fstrim`, :func:`parse_fsinfo`, :func:`parse_exec_status`,
:func:`wait_for_exec` and :func:`loads_reply` are shared with the libvirt path
(``qemuAgentCommand``); :func:`parse_query_block` and :func:`parse_blockstats` are
the one reader of those QMP answers (trim, audit --qmp and the test VMs use them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import Message

from vmtrim._util.log import get_logger
from vmtrim.errors import AgentCommandFailed, AgentUnavailable

T = TypeVar("T")
log = get_logger(__name__)
S = TypeVar("S", bound="_Session")

# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FstrimPath:
    """One filesystem in a guest-fstrim reply: ``trimmed`` is an upper bound, not host bytes."""

    path: str
    trimmed: int | None = None
    minimum: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "trimmed": self.trimmed,
            "minimum": self.minimum,
            "error": self.error,
        }


@dataclass(frozen=True)
class FstrimResult:
    paths: list[FstrimPath] = field(default_factory=list)

    @property
    def trimmed(self) -> int:
        return sum(p.trimmed or 0 for p in self.paths)

    @property
    def errors(self) -> list[FstrimPath]:
        return [p for p in self.paths if p.error]

    def to_json(self) -> dict[str, Any]:
        return {"paths": [p.to_json() for p in self.paths], "trimmed": self.trimmed}


@dataclass(frozen=True)
class FsInfo:
    name: str
    mountpoint: str
    type: str
    used_bytes: int | None
    total_bytes: int | None
    disks: list[dict[str, Any]]


@dataclass(frozen=True)
class ExecStatus:
    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    out_data: bytes = b""
    err_data: bytes = b""


# --- reading replies -------------------------------------------------------------------

#: The longest reply line accepted (qemu.qmp's own default is 10 MiB). The largest
#: honest answers (query-block, x-debug-query-block-graph of a big VM) are far smaller.
MAX_REPLY_BYTES = 4 * 1024 * 1024
#: QMP integers are int64 or uint64: at most 20 digits and a sign.
_MAX_DIGITS = 21
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)


class ReplyRejected(ValueError):
    """A reply that is too long, too deep, or holds a number no QMP type has."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ReplyRejected(f"an integer of {len(text)} digits")
    return int(text)


def _no_constant(name: str) -> object:
    raise ReplyRejected(f"a bare {name}, which JSON does not have")


def loads_reply(data: bytes | str, limit: int = MAX_REPLY_BYTES) -> Any:
    """One QMP/agent reply line as JSON, or :class:`ReplyRejected` saying why not."""
    if len(data) > limit:
        raise ReplyRejected(f"a reply of {len(data)} bytes (the limit is {limit})")
    try:
        return json.loads(data, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ReplyRejected("JSON nested too deeply") from exc
    except ReplyRejected:
        raise
    except ValueError as exc:  # JSONDecodeError, bad UTF-8
        raise ReplyRejected(f"not JSON ({str(exc)[:60]})") from exc


def _number(
    value: object,
    what: str,
    bounds: tuple[int, int],
    *,
    command: str,
    subject: str | None,
) -> int | None:
    """``value`` if it is an integer within ``bounds``; None if absent; else the guest lies."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]:
        return value
    shown = f"{value!r:.40}" if not isinstance(value, int) else f"{value:.3g}"
    raise AgentCommandFailed(
        f"{command} returned {what} {shown}, outside {bounds[0]}..{bounds[1]}",
        subject=subject,
        command=command,
    )


def _bytes_field(ret: dict[str, Any], key: str, command: str, subject: str | None) -> bytes:
    value = ret.get(key, "")
    try:
        if not isinstance(value, str):
            raise ValueError(type(value).__name__)
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise AgentCommandFailed(
            f"{command} returned {key} that is not base64", subject=subject, command=command
        ) from exc


def _as_dict(ret: object, command: str, subject: str | None) -> dict[str, Any]:
    if not isinstance(ret, dict):
        raise AgentCommandFailed(
            f"{command} returned {ret!r:.80}", subject=subject, command=command
        )
    return ret


def parse_fstrim(ret: object, subject: str | None = None) -> FstrimResult:
    """The ``return`` of guest-fstrim. Agents before 2.4 return ``{}``: no paths.

    ``trimmed`` and ``minimum`` are QAPI ``int``; a negative byte count is a lie.
    """
    command = "guest-fstrim"
    entries = _as_dict(ret, command, subject).get("paths", [])
    if not isinstance(entries, list):
        raise AgentCommandFailed(
            f"guest-fstrim returned paths {entries!r:.80}", subject=subject, command=command
        )
    paths = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise AgentCommandFailed(
                f"guest-fstrim returned a bad path entry {entry!r:.80}",
                subject=subject,
                command=command,
            )
        error = entry.get("error")
        where = f"{entry['path']!r:.80}"
        paths.append(
            FstrimPath(
                path=entry["path"],
                trimmed=_number(
                    entry.get("trimmed"),
                    f"trimmed for {where}",
                    (0, INT64[1]),
                    command=command,
                    subject=subject,
                ),
                minimum=_number(
                    entry.get("minimum"),
                    f"minimum for {where}",
                    (0, INT64[1]),
                    command=command,
                    subject=subject,
                ),
                error=error if isinstance(error, str) else None,
            )
        )
    return FstrimResult(paths)


def parse_fsinfo(ret: object, subject: str | None = None) -> list[FsInfo]:
    """The ``return`` of guest-get-fsinfo (the libvirt path shares it)."""
    command = "guest-get-fsinfo"
    out = []
    for fs in ret if isinstance(ret, list) else []:
        if isinstance(fs, dict):
            name = str(fs.get("name", ""))[:4096]

            def size(key: str, fs: dict[str, Any] = fs, name: str = name) -> int | None:
                return _number(
                    fs.get(key), f"{key} for {name!r:.80}", UINT64, command=command, subject=subject
                )

            disks = fs.get("disk", [])
            out.append(
                FsInfo(
                    name=name,
                    mountpoint=str(fs.get("mountpoint", "")),
                    type=str(fs.get("type", "")),
                    used_bytes=size("used-bytes"),
                    total_bytes=size("total-bytes"),
                    disks=[d for d in disks if isinstance(d, dict)]
                    if isinstance(disks, list)
                    else [],
                )
            )
    return out


def parse_exec_status(ret: object, subject: str | None = None) -> ExecStatus:
    """The ``return`` of guest-exec-status; exit codes are range-checked (Windows: DWORD)."""
    command = "guest-exec-status"
    status = _as_dict(ret, command, subject)
    return ExecStatus(
        exited=status.get("exited") is True,
        exitcode=_number(
            status.get("exitcode"),
            "exitcode",
            (-(2**31), 2**32 - 1),
            command=command,
            subject=subject,
        ),
        signal=_number(status.get("signal"), "signal", (0, 255), command=command, subject=subject),
        out_data=_bytes_field(status, "out-data", command, subject),
        err_data=_bytes_field(status, "err-data", command, subject),
    )


def parse_exec_pid(ret: object, subject: str | None = None) -> int:
    """The pid in guest-exec's ``return``."""
    pid = _number(
        _as_dict(ret, "guest-exec", subject).get("pid"),
        "pid",
        (1, 2**32 - 1),
        command="guest-exec",
        subject=subject,
    )
    if pid is None:
        raise AgentCommandFailed(
            f"guest-exec returned {ret!r:.80}", subject=subject, command="guest-exec"
        )
    return pid


class ExecAgent(Protocol):
    """An agent that can report on a guest-exec'd process (direct socket or libvirt)."""

    def exec_status(self, pid: int, *, timeout: float) -> ExecStatus: ...


def wait_for_exec(
    agent: ExecAgent, pid: int, deadline: float, *, what: str, subject: str | None
) -> ExecStatus:
    """Poll guest-exec-status for ``pid`` until it exits; AgentUnavailable at ``deadline``
    (``time.monotonic()``). The one polling loop of both agent paths."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentUnavailable(
                f"{what} (guest pid {pid}) did not exit in time", subject=subject
            )
        status = agent.exec_status(pid, timeout=remaining)
        if status.exited:
            return status
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


# --- block devices (query-block, query-blockstats) ---------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    """One entry of query-block: a BlockBackend, its guest device and its medium, if any."""

    device: str  # the BlockBackend name (-drive id); "" for a -blockdev-only backend
    qdev: str  # the guest device's id or QOM path
    inserted: dict[str, Any] | None  # the medium's top node (BlockDeviceInfo), or None

    @property
    def read_only(self) -> bool:
        return bool(self.inserted and self.inserted.get("ro"))

    @property
    def node_name(self) -> str:
        name = self.inserted.get("node-name") if self.inserted else None
        return name if isinstance(name, str) else ""

    @property
    def filename(self) -> str | None:
        """The image file of the top node (``image.filename``, else ``file``)."""
        if not self.inserted:
            return None
        image = self.inserted.get("image")
        name = image.get("filename") if isinstance(image, dict) else None
        name = name if isinstance(name, str) else self.inserted.get("file")
        return name if isinstance(name, str) else None


def parse_query_block(ret: object) -> list[BlockDevice]:
    """query-block's ``return``; entries that are not objects are left out."""
    out = []
    for entry in ret if isinstance(ret, list) else []:
        if not isinstance(entry, dict):
            continue
        inserted = entry.get("inserted")
        out.append(
            BlockDevice(
                device=str(entry.get("device") or ""),
                qdev=str(entry.get("qdev") or ""),
                inserted=inserted if isinstance(inserted, dict) else None,
            )
        )
    return out


@dataclass(frozen=True)
class BlockStats:
    """The discard counters of one query-blockstats entry (QEMU >= 4.2)."""

    device: str
    qdev: str
    node_name: str
    unmap_bytes: int
    unmap_operations: int
    wr_bytes: int

    @property
    def key(self) -> str:
        return self.qdev or self.device


def parse_blockstats(ret: object, subject: str | None = None) -> list[BlockStats]:
    """query-blockstats' ``return``; counters are uint64, checked as such."""
    command = "query-blockstats"
    out = []
    for entry in ret if isinstance(ret, list) else []:
        stats = entry.get("stats") if isinstance(entry, dict) else None
        if not isinstance(stats, dict):
            continue

        def count(key: str, stats: dict[str, Any] = stats) -> int:
            value = _number(stats.get(key), key, UINT64, command=command, subject=subject)
            return value or 0

        out.append(
            BlockStats(
                device=str(entry.get("device") or ""),
                qdev=str(entry.get("qdev") or ""),
                node_name=str(entry.get("node-name") or ""),
                unmap_bytes=count("unmap_bytes"),
                unmap_operations=count("unmap_operations"),
                wr_bytes=count("wr_bytes"),
            )
        )
    return out


# --- the async clients --------------------------------------------------------------------


class _Client(QMPClient):
    """QMPClient that refuses hostile replies instead of crashing its reader task.

    qemu.qmp's reader raises whatever ``json.loads`` raises (RecursionError, the
    int-str ValueError) or StreamReader's overrun ValueError, and re-raises it from
    ``disconnect()``. Here each becomes a ProtocolError, and ``rejected`` keeps the
    reason for the command that was waiting.
    """

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(name, readbuflen=limit)
        self.limit = limit
        self.rejected: str | None = None

    async def _do_recv(self) -> Message:
        try:
            line = await self._readline()
        except ValueError as exc:  # StreamReader: no newline within readbuflen bytes
            raise self._reject(f"a reply line over {self.limit} bytes") from exc
        try:
            value = loads_reply(line, self.limit)
        except ReplyRejected as exc:
            raise self._reject(str(exc)) from exc
        if not isinstance(value, dict):
            raise self._reject(f"a reply that is not a JSON object ({value!r:.40})")
        return Message(value)

    def _reject(self, reason: str) -> ProtocolError:
        self.rejected = self.rejected or reason
        return ProtocolError(f"reply rejected: {reason}")


class _Session:
    """A QMPClient with time limits and errors mapped to AgentUnavailable/AgentCommandFailed.

    ``timeout`` limits each call; ``deadline`` (``time.monotonic()``), when set,
    limits them all together, so a caller's --timeout bounds the whole session.
    """

    greeting = True

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = 10.0,
        subject: str | None = None,
        deadline: float | None = None,
        limit: int = MAX_REPLY_BYTES,
    ):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.deadline = deadline
        self.subject = subject or self.socket_path
        self._client = _Client(f"vmtrim:{self.subject}", limit)
        self._client.await_greeting = self.greeting
        self._client.negotiate = self.greeting

    def _limit(self, timeout: float | None = None) -> float:
        """Seconds the next call may take: its own limit, cut to the session's deadline."""
        seconds = timeout or self.timeout
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - time.monotonic())
        if seconds <= 0:
            raise self._unavailable(f"no answer within the time limit ({self.timeout:g} s)")
        return seconds

    def _unavailable(self, what: str, exc: BaseException | None = None) -> AgentUnavailable:
        detail = f": {exc}" if exc is not None and str(exc) else ""
        return AgentUnavailable(f"{what}{detail}", subject=self.subject)

    def _failed(
        self, command: str, what: str, error_class: str | None = None
    ) -> AgentCommandFailed:
        return AgentCommandFailed(
            what, subject=self.subject, command=command, error_class=error_class
        )

    def _lost(self, command: str, exc: BaseException) -> AgentUnavailable | AgentCommandFailed:
        """A dropped connection; a hostile reply (our reader refused it) is the command's fault."""
        if self._client.rejected:
            return self._failed(command, f"{command}: refused the reply: {self._client.rejected}")
        return self._unavailable(f"{command}: the connection failed", exc)

    async def _connect(self) -> None:
        """Connect, retrying while the socket does not exist yet (QEMU still starting)."""
        deadline = time.monotonic() + self._limit()
        while True:
            try:
                await asyncio.wait_for(
                    self._client.connect(self.socket_path), max(0.01, deadline - time.monotonic())
                )
                return
            except (TimeoutError, QMPError, OSError) as exc:
                if self._client.rejected:  # a hostile greeting: retrying will not help
                    raise self._lost("connect", exc) from exc
                if time.monotonic() >= deadline:
                    raise self._unavailable("cannot connect", exc) from exc
                await asyncio.sleep(0.1)

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> object:
        log.debug("%s: %s", self.subject, command)
        seconds = self._limit(timeout)
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), seconds)
        except TimeoutError as exc:
            raise self._unavailable(f"{command} got no answer within {seconds:.3g} s") from exc
        except ExecuteError as exc:
            raise self._failed(
                command, f"{command} failed: {exc.error.error.desc}", exc.error.error.class_
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise self._lost(command, exc) from exc
        except (KeyError, TypeError, ValueError) as exc:  # an error reply of the wrong shape
            raise self._failed(command, f"{command}: malformed reply ({exc!r:.60})") from exc

    async def open(self) -> None:
        await self._connect()

    async def close(self) -> None:
        # disconnect() re-raises whatever ended the reader; closing must not mask the
        # real error (or turn a refused reply into an internal error).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5)

    async def __aenter__(self) -> Self:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Monitor(_Session):
    """QEMU's QMP monitor (greeting and qmp_capabilities handled by QMPClient)."""


class GuestAgent(_Session):
    """The QEMU guest agent (qemu-ga) on a virtio-serial socket."""

    greeting = False

    async def open(self) -> None:
        await self._connect()
        await self.sync()

    async def sync(self) -> None:
        """guest-sync with a random id until that id comes back (flushes stale replies).

        The agent may not be running yet (the guest is booting), so each attempt has a
        short limit and the whole loop has ``timeout``.
        """
        deadline = time.monotonic() + self._limit()
        while True:
            token = random.randrange(1, 2**31)
            remaining = deadline - time.monotonic()
            try:
                ret = await asyncio.wait_for(
                    self._client.execute("guest-sync", {"id": token}), max(0.1, min(2.0, remaining))
                )
                if ret == token:
                    return
            except (TimeoutError, ExecuteError):
                pass
            except (QMPError, OSError, EOFError) as exc:
                raise self._lost("guest-sync", exc) from exc
            if time.monotonic() >= deadline:
                raise self._unavailable(f"the guest agent did not answer within {self.timeout:g} s")

    async def ping(self) -> None:
        await self.execute("guest-ping")

    async def fstrim(self, minimum: int = 0, *, timeout: float | None = None) -> FstrimResult:
        """guest-fstrim on every mounted filesystem; trimming can take minutes on big disks."""
        ret = await self.execute(
            "guest-fstrim", {"minimum": minimum}, timeout=timeout or max(self.timeout, 300.0)
        )
        return parse_fstrim(ret, self.subject)

    async def get_fsinfo(self) -> list[FsInfo]:
        return parse_fsinfo(await self.execute("guest-get-fsinfo"), self.subject)

    async def get_osinfo(self) -> dict[str, Any]:
        ret = await self.execute("guest-get-osinfo")
        return ret if isinstance(ret, dict) else {}

    async def exec(self, path: str, args: list[str] | None = None) -> int:
        """Start a program in the guest (guest-exec); returns its pid for exec_status."""
        ret = await self.execute(
            "guest-exec", {"path": path, "arg": args or [], "capture-output": True}
        )
        return parse_exec_pid(ret, self.subject)

    async def exec_status(self, pid: int, *, timeout: float | None = None) -> ExecStatus:
        ret = await self.execute("guest-exec-status", {"pid": pid}, timeout=timeout)
        return parse_exec_status(ret, self.subject)


# --- blocking wrappers ----------------------------------------------------------------------


class _Blocking(Generic[S]):
    """Runs one async session on a private event loop, so threads can each own one."""

    _kind: type[S]

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = 10.0,
        subject: str | None = None,
        deadline: float | None = None,
    ) -> None:
        self._session = self._kind(socket_path, timeout=timeout, subject=subject, deadline=deadline)
        self._loop = asyncio.new_event_loop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        task = self._loop.create_task(coro)
        try:
            return self._loop.run_until_complete(task)
        except BaseException:
            # A Ctrl-C/SIGTERM can leave the task pending; finish it here, or its later
            # failure (the VM is killed) is logged at exit as "never retrieved".
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(task)
            if not task.cancelled():
                with contextlib.suppress(BaseException):
                    task.exception()
            raise

    def __enter__(self) -> Self:
        try:
            self._run(self._session.__aenter__())
        except BaseException:
            self._close_loop()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._run(self._session.close())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        """Cancel what a Ctrl-C left running, so nothing is destroyed while pending."""
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            with contextlib.suppress(BaseException):
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()


class SyncGuestAgent(_Blocking[GuestAgent]):
    """Blocking :class:`GuestAgent`: ``with SyncGuestAgent(path) as ga: ga.fstrim()``."""

    _kind = GuestAgent

    def ping(self) -> None:
        self._run(self._session.ping())

    def fstrim(self, minimum: int = 0, *, timeout: float | None = None) -> FstrimResult:
        return self._run(self._session.fstrim(minimum, timeout=timeout))

    def get_fsinfo(self) -> list[FsInfo]:
        return self._run(self._session.get_fsinfo())

    def get_osinfo(self) -> dict[str, Any]:
        return self._run(self._session.get_osinfo())

    def exec_status(self, pid: int, *, timeout: float | None = None) -> ExecStatus:
        return self._run(self._session.exec_status(pid, timeout=timeout))

    def run(
        self, path: str, args: list[str] | None = None, *, timeout: float | None = None
    ) -> ExecStatus:
        """guest-exec ``path args`` and wait (``timeout``, all told) for it to exit."""
        deadline = time.monotonic() + (timeout or self._session.timeout)
        pid = self._run(self._session.exec(path, args))
        return wait_for_exec(self, pid, deadline, what=path, subject=self._session.subject)


class SyncMonitor(_Blocking[Monitor]):
    """Blocking QMP monitor: ``with SyncMonitor(path) as qmp: qmp.execute('query-status')``."""

    _kind = Monitor

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> object:
        return self._run(self._session.execute(command, arguments, timeout=timeout))
