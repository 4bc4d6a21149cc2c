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
:func:`parse_fstrim` and :func:`parse_fsinfo` are shared with the libvirt path
(``qemuAgentCommand``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from vmtrim.errors import AgentCommandFailed, AgentUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
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


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_fstrim(ret: object, subject: str | None = None) -> FstrimResult:
    """The ``return`` of guest-fstrim. Agents before 2.4 return ``{}``: no paths."""
    if not isinstance(ret, dict):
        raise AgentCommandFailed(
            f"guest-fstrim returned {ret!r:.80}", subject=subject, command="guest-fstrim"
        )
    paths = []
    for entry in ret.get("paths", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise AgentCommandFailed(
                f"guest-fstrim returned a bad path entry {entry!r:.80}",
                subject=subject,
                command="guest-fstrim",
            )
        error = entry.get("error")
        paths.append(
            FstrimPath(
                path=entry["path"],
                trimmed=_int_or_none(entry.get("trimmed")),
                minimum=_int_or_none(entry.get("minimum")),
                error=error if isinstance(error, str) else None,
            )
        )
    return FstrimResult(paths)


def parse_fsinfo(ret: object) -> list[FsInfo]:
    """The ``return`` of guest-get-fsinfo (the libvirt path shares it)."""
    out = []
    for fs in ret if isinstance(ret, list) else []:
        if isinstance(fs, dict):
            out.append(
                FsInfo(
                    name=str(fs.get("name", "")),
                    mountpoint=str(fs.get("mountpoint", "")),
                    type=str(fs.get("type", "")),
                    used_bytes=_int_or_none(fs.get("used-bytes")),
                    total_bytes=_int_or_none(fs.get("total-bytes")),
                    disks=[d for d in fs.get("disk", []) if isinstance(d, dict)],
                )
            )
    return out


# --- the async clients --------------------------------------------------------------------


class _Session:
    """A QMPClient with time limits and errors mapped to AgentUnavailable/AgentCommandFailed."""

    greeting = True

    def __init__(self, socket_path: str, *, timeout: float = 10.0, subject: str | None = None):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.subject = subject or self.socket_path
        self._client = QMPClient(f"vmtrim:{self.subject}")
        self._client.await_greeting = self.greeting
        self._client.negotiate = self.greeting

    def _unavailable(self, what: str, exc: BaseException | None = None) -> AgentUnavailable:
        detail = f": {exc}" if exc is not None and str(exc) else ""
        return AgentUnavailable(f"{what}{detail}", subject=self.subject)

    def _failed(
        self, command: str, what: str, error_class: str | None = None
    ) -> AgentCommandFailed:
        return AgentCommandFailed(
            what, subject=self.subject, command=command, error_class=error_class
        )

    async def _connect(self) -> None:
        """Connect, retrying while the socket does not exist yet (QEMU still starting)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                await asyncio.wait_for(self._client.connect(self.socket_path), self.timeout)
                return
            except (TimeoutError, QMPError, OSError) as exc:
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
        try:
            return await asyncio.wait_for(
                self._client.execute(command, arguments), timeout or self.timeout
            )
        except TimeoutError as exc:
            raise self._unavailable(
                f"{command} got no answer within {timeout or self.timeout:g} s"
            ) from exc
        except ExecuteError as exc:
            raise self._failed(
                command, f"{command} failed: {exc.error.error.desc}", exc.error.error.class_
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise self._unavailable(f"{command}: the connection failed", exc) from exc

    async def open(self) -> None:
        await self._connect()

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
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
        deadline = time.monotonic() + self.timeout
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
                raise self._unavailable("guest-sync failed", exc) from exc
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
        return parse_fsinfo(await self.execute("guest-get-fsinfo"))

    async def get_osinfo(self) -> dict[str, Any]:
        ret = await self.execute("guest-get-osinfo")
        return ret if isinstance(ret, dict) else {}

    async def exec(self, path: str, args: list[str] | None = None) -> int:
        """Start a program in the guest (guest-exec); returns its pid for exec_status."""
        ret = await self.execute(
            "guest-exec", {"path": path, "arg": args or [], "capture-output": True}
        )
        pid = _int_or_none(ret.get("pid")) if isinstance(ret, dict) else None
        if pid is None:
            raise self._failed("guest-exec", f"guest-exec returned {ret!r:.80}")
        return pid

    async def exec_status(self, pid: int) -> ExecStatus:
        ret = await self.execute("guest-exec-status", {"pid": pid})
        if not isinstance(ret, dict):
            raise self._failed("guest-exec-status", f"guest-exec-status returned {ret!r:.80}")
        return ExecStatus(
            exited=bool(ret.get("exited")),
            exitcode=_int_or_none(ret.get("exitcode")),
            signal=_int_or_none(ret.get("signal")),
            out_data=base64.b64decode(ret.get("out-data", "")),
            err_data=base64.b64decode(ret.get("err-data", "")),
        )

    async def run(
        self, path: str, args: list[str] | None = None, *, timeout: float | None = None
    ) -> ExecStatus:
        """guest-exec and poll guest-exec-status until the program exits."""
        pid = await self.exec(path, args)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            status = await self.exec_status(pid)
            if status.exited:
                return status
            if time.monotonic() >= deadline:
                raise self._unavailable(f"{path} did not exit within {timeout or self.timeout:g} s")
            await asyncio.sleep(0.1)


# --- blocking wrappers ----------------------------------------------------------------------


class _Blocking(Generic[S]):
    """Runs one async session on a private event loop, so threads can each own one."""

    def __init__(self, session: S) -> None:
        self._loop = asyncio.new_event_loop()
        self._session = session

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

    def __init__(self, socket_path: str, *, timeout: float = 10.0, subject: str | None = None):
        super().__init__(GuestAgent(socket_path, timeout=timeout, subject=subject))

    def ping(self) -> None:
        self._run(self._session.ping())

    def fstrim(self, minimum: int = 0, *, timeout: float | None = None) -> FstrimResult:
        return self._run(self._session.fstrim(minimum, timeout=timeout))

    def get_fsinfo(self) -> list[FsInfo]:
        return self._run(self._session.get_fsinfo())

    def get_osinfo(self) -> dict[str, Any]:
        return self._run(self._session.get_osinfo())

    def run(
        self, path: str, args: list[str] | None = None, *, timeout: float | None = None
    ) -> ExecStatus:
        return self._run(self._session.run(path, args, timeout=timeout))


class SyncMonitor(_Blocking[Monitor]):
    """Blocking QMP monitor: ``with SyncMonitor(path) as qmp: qmp.execute('query-status')``."""

    def __init__(self, socket_path: str, *, timeout: float = 10.0, subject: str | None = None):
        super().__init__(Monitor(socket_path, timeout=timeout, subject=subject))

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> object:
        return self._run(self._session.execute(command, arguments, timeout=timeout))
