"""Many libvirt hosts at once: the host list, one bounded connection per host, isolation.

A fleet is reached through libvirt's own remote transports (``qemu+ssh://``,
``qemu+tcp://``, ``qemu+tls://``, a unix ``?socket=``), never through an agent of ours.

Isolation: every host runs in a worker of its own (``--hosts-parallel`` at a time), on
connections of its own. Opening a connection runs in a daemon thread that is abandoned
after ``--connect-timeout``: ``virConnectOpen`` has no deadline of its own, and a daemon
that accepts the TCP connection and then hangs (stopped, swapping, wedged) would block it
for ever. Each connection then gets libvirt's keepalive (``virConnectSetKeepAlive``; it
needs libvirt's event loop, which :func:`~vmtrim.channels.libvirt_events.start_event_loop`
runs in a daemon thread), so a host that stops answering mid-run closes its connection,
and every call still waiting on it fails, after about ``--connect-timeout`` too. The
failure belongs to that host alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from vmtrim.channels.libvirt import Connection, libvirt_module, open_connection
from vmtrim.channels.libvirt_events import start_event_loop
from vmtrim.errors import BadInput, HostUnreachable, VmtrimError

R = TypeVar("R")
log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_HOSTS_PARALLEL = 8
KEEPALIVE_COUNT = 3  # unanswered keepalive probes before libvirt closes the connection


def read_hosts_file(path: str) -> list[str]:
    """One URI per line; blank lines and ``#`` comments (whole-line or trailing) skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the host list: {exc}", subject=path) from exc
    uris = []
    for number, line in enumerate(text.splitlines(), 1):
        uri = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not uri:
            continue
        if any(ch.isspace() for ch in uri):
            raise BadInput(f"line {number}: one URI per line, got {uri!r:.80}", subject=path)
        uris.append(uri)
    if not uris:
        raise BadInput("the host list names no URI", subject=path)
    return uris


def host_list(uris: Iterable[str], hosts_file: str | None) -> list[str]:
    """``-c`` URIs then the file's, each once, in the order given."""
    every = [*uris, *(read_hosts_file(hosts_file) if hosts_file else [])]
    return list(dict.fromkeys(every))


def is_remote(uri: str) -> bool:
    """True when the host's files are not ours to read: a transport (``+ssh``, ``+tcp``,
    ``+tls``) or a host name. Only the plain local URI (``qemu:///system``, a ``?socket=``)
    is measured with ``du``; even ``qemu+tcp://127.0.0.1`` may be a container or another
    mount namespace, so it is measured through libvirt."""
    parts = urlsplit(uri)
    return "+" in parts.scheme or bool(parts.netloc)


def connect_host(uri: str, timeout: float) -> Connection:
    """Open ``uri`` within ``timeout`` seconds, with keepalive; HostUnreachable otherwise.

    A connection that opens only after we gave up on it is closed at once.
    """
    start_event_loop()
    box: dict[str, object] = {}
    abandoned = threading.Event()
    done = threading.Event()

    def opener() -> None:
        try:
            conn = open_connection(uri)
        except BaseException as exc:
            box["error"] = exc
            done.set()
            return
        if abandoned.is_set():
            conn.close()
            return
        box["conn"] = conn
        done.set()

    threading.Thread(target=opener, name="vmtrim-connect", daemon=True).start()
    if not done.wait(timeout):
        abandoned.set()
        raise HostUnreachable(f"no answer within --connect-timeout {timeout:g} s", subject=uri)
    error = box.get("error")
    if isinstance(error, VmtrimError):
        raise HostUnreachable(error.message, subject=uri) from error
    if isinstance(error, BaseException):
        raise HostUnreachable(f"cannot connect: {error}", subject=uri) from error
    conn = box["conn"]
    assert isinstance(conn, Connection)
    conn.uri = uri  # the URI as given: getURI() may drop what a reconnect needs
    interval = max(1, math.ceil(timeout / KEEPALIVE_COUNT))
    libvirt = libvirt_module()
    try:
        conn.conn.setKeepAlive(interval, KEEPALIVE_COUNT)
    except libvirt.libvirtError as exc:  # e.g. a driver without keepalive (test://)
        log.debug("%s: no keepalive: %s", uri, exc)
    return conn


def alive(conn: Connection) -> bool:
    try:
        return bool(conn.conn.isAlive())
    except Exception:
        return False


@dataclass
class HostRun(Generic[R]):
    """What one host gave: the work's value, or why the host failed."""

    uri: str
    value: R | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class Fleet:
    """How to work on many hosts: how many at once, and how long a host may take to answer."""

    uris: Sequence[str]
    parallel: int = DEFAULT_HOSTS_PARALLEL
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    on_host_done: Callable[[HostRun[object]], None] | None = field(default=None, repr=False)

    def run(self, work: Callable[[Connection], R]) -> list[HostRun[R]]:
        """``work(conn)`` on every host, on its own connection; results in the hosts' order.

        A host that fails to connect, whose ``work`` raises, or whose connection is found
        dead afterwards (keepalive closed it, the daemon went away) is that host's
        failure; ``work``'s value is kept when it has one.
        """
        with ThreadPoolExecutor(
            max_workers=max(1, min(self.parallel, len(self.uris))),
            thread_name_prefix="vmtrim-host",
        ) as pool:
            futures = [pool.submit(self._one, uri, work) for uri in self.uris]
            return [f.result() for f in futures]

    def _one(self, uri: str, work: Callable[[Connection], R]) -> HostRun[R]:
        start = time.monotonic()
        run: HostRun[R] = HostRun(uri)
        try:
            conn = connect_host(uri, self.connect_timeout)
        except VmtrimError as exc:
            run.error = exc.message
        else:
            try:
                run.value = work(conn)
                if not alive(conn):
                    run.error = "the connection dropped during the run (keepalive or daemon exit)"
            except VmtrimError as exc:
                run.error = exc.one_line() if exc.subject != uri else exc.message
            except Exception as exc:  # a libvirt error on a dying connection, a bug
                run.error = f"{type(exc).__name__}: {exc}"
            finally:
                with suppress(Exception):
                    conn.close()
        run.seconds = time.monotonic() - start
        log.debug("%s: %s in %.3f s", uri, run.error or "ok", run.seconds)
        if self.on_host_done is not None:
            self.on_host_done(run)  # type: ignore[arg-type]
        return run


def choose_domains(
    conn: Connection, specs: Sequence[str], every: bool, *, running_only: bool = False
) -> tuple[list[object], list[str]]:
    """(domains, names not on this host): ``--all``, or the named domains this host has.

    On a fleet a name is looked for on every host; a host without it is no error.
    """
    from vmtrim.channels.libvirt import lookup_domain, select_domains

    if every or not specs:
        return select_domains(conn, specs, every, running_only=running_only), []
    chosen, missing, seen = [], [], set()
    for spec in specs:
        try:
            dom = lookup_domain(conn, spec)
        except BadInput:  # not on this host
            missing.append(spec)
            continue
        if str(dom.UUIDString()) not in seen:
            seen.add(str(dom.UUIDString()))
            chosen.append(dom)
    return chosen, missing


def connect_all(
    uris: Sequence[str], timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> list[tuple[str, Connection | HostUnreachable]]:
    """Open every host at once (each within ``timeout``, with keepalive): (uri, connection
    or why not), in the given order. For callers that then work on the connections
    themselves (``vmtrim run``): a dead host costs ``timeout`` once, not once per host."""
    if not uris:
        return []

    def one(uri: str) -> Connection | HostUnreachable:
        try:
            return connect_host(uri, timeout)
        except HostUnreachable as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(uris), thread_name_prefix="vmtrim-connect") as pool:
        return list(zip(uris, pool.map(one, uris), strict=True))
