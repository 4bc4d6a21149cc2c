"""The libvirt connection: lazy import, URI choice, domain lookup, one-line errors.

libvirt-python is an optional extra (``vmtrim[libvirt]``), so it is imported only
here and only when a command asks for a hypervisor. libvirt's default error
handler prints every error to stderr on its own; we silence it once at import and
turn the exceptions into :mod:`vmtrim.errors` with the URI or domain as subject.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from vmtrim._util.log import get_logger
from vmtrim._util.versions import Version, format_version, from_libvirt
from vmtrim.channels.qmp import (
    ExecStatus,
    FstrimResult,
    ReplyRejected,
    loads_reply,
    parse_exec_pid,
    parse_exec_status,
    parse_fstrim,
    wait_for_exec,
)
from vmtrim.errors import AgentCommandFailed, AgentUnavailable, BadInput, EnvironmentProblem

INSTALL_HINT = "install vmtrim[libvirt] (pip install 'vmtrim[libvirt]')"
_UUID = re.compile(r"^[0-9a-f]{8}(-?[0-9a-f]{4}){3}-?[0-9a-f]{12}$", re.IGNORECASE)

_modules: dict[str, ModuleType] = {}
log = get_logger(__name__)


def _import(name: str) -> ModuleType:
    if name not in _modules:
        try:
            module = __import__(name)
        except ImportError as exc:
            raise EnvironmentProblem(INSTALL_HINT, subject="libvirt-python") from exc
        if name == "libvirt":
            # Without this libvirt prints "libvirt: QEMU Driver error : ..." itself.
            module.registerErrorHandler(_ignore_error, None)
        _modules[name] = module
    return _modules[name]


def _ignore_error(_ctx: object, _err: object) -> None:
    return None


def libvirt_module() -> ModuleType:
    """``import libvirt``, or a one-line EnvironmentProblem telling how to install it."""
    return _import("libvirt")


def libvirt_qemu_module() -> ModuleType:
    _import("libvirt")
    return _import("libvirt_qemu")


def error_text(exc: BaseException) -> str:
    """libvirt's own message, without the 'libvirt: ... error :' prefix noise."""
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return " ".join(str(text or exc).split())


def error_code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    code = get() if callable(get) else None
    return code if isinstance(code, int) else None


def resolve_uri(uri: str | None) -> str | None:
    """-c wins, then LIBVIRT_DEFAULT_URI; None lets libvirt pick its own default."""
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or None


def is_local_uri(uri: str) -> bool:
    """True when the hypervisor runs on this host, so its file paths are our paths."""
    host = urlsplit(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


@dataclass
class Connection:
    """An open libvirt connection and the URI it answers to."""

    conn: Any
    uri: str

    @property
    def local(self) -> bool:
        return is_local_uri(self.uri)

    @cached_property
    def _versions(self) -> tuple[Version | None, Version]:
        libvirt = libvirt_module()
        try:
            hv = int(self.conn.getVersion()) if self.conn.getType() == "QEMU" else 0
        except libvirt.libvirtError:
            hv = 0
        lib = int(self.conn.getLibVersion())
        return (from_libvirt(hv) if hv else None), from_libvirt(lib)

    def version_numbers(self) -> tuple[Version | None, Version]:
        """(QEMU version, libvirt version), from the daemon itself.

        The first is None when the driver is not QEMU (the test driver says 0.0.2).
        Asked once per connection: libvirtd's getVersion takes seconds under load.
        """
        return self._versions

    def versions(self) -> tuple[str | None, str]:
        """:meth:`version_numbers` as dotted strings ("7.2.0"), for JSON and tables."""
        hv, lib = self._versions
        return (format_version(hv) if hv else None), format_version(lib)

    def close(self) -> None:
        # Closing a dead connection must not mask the real error.
        with suppress(Exception):
            self.conn.close()


def open_connection(uri: str | None) -> Connection:
    """Open ``uri`` (or the default); one-line EnvironmentProblem (exit 3) on failure."""
    libvirt = libvirt_module()
    uri = resolve_uri(uri)
    subject = uri or "libvirt"
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise EnvironmentProblem(f"cannot connect: {error_text(exc)}", subject=subject) from exc
    if conn is None:  # old bindings returned None instead of raising
        raise EnvironmentProblem("cannot connect", subject=subject)
    return Connection(conn=conn, uri=conn.getURI() or subject)


@contextmanager
def connection(uri: str | None) -> Iterator[Connection]:
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        conn.close()


def lookup_domain(conn: Connection, spec: str) -> Any:
    """A domain by ID, UUID or name, in that order of how the spec looks."""
    libvirt = libvirt_module()
    attempts: list[tuple[str, Any]] = []
    if spec.isdigit():
        attempts.append(("id", lambda: conn.conn.lookupByID(int(spec))))
    if _UUID.match(spec):
        attempts.append(("uuid", lambda: conn.conn.lookupByUUIDString(spec)))
    attempts.append(("name", lambda: conn.conn.lookupByName(spec)))
    last: BaseException | None = None
    for _kind, lookup in attempts:
        try:
            return lookup()
        except libvirt.libvirtError as exc:
            if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                raise EnvironmentProblem(error_text(exc), subject=spec) from exc
            last = exc
    raise BadInput(f"no such domain on {conn.uri}", subject=spec) from last


def select_domains(
    conn: Connection, specs: Iterable[str], every: bool, *, running_only: bool = False
) -> list[Any]:
    """The domains named on the command line, or every domain with ``--all``.

    With ``running_only``, ``--all`` means the running domains (``trim``: a shut-off
    domain has no agent to ask); named domains are always returned, running or not.
    Names are de-duplicated by UUID, keeping the order the user gave.
    """
    specs = list(specs)
    if every and specs:
        raise BadInput("give domain names or --all, not both", subject="--all")
    if every:
        libvirt = libvirt_module()
        try:
            flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if running_only else 0
            domains = list(conn.conn.listAllDomains(flags))
        except libvirt.libvirtError as exc:
            raise EnvironmentProblem(error_text(exc), subject=conn.uri) from exc
        return sorted(domains, key=lambda d: str(d.name()))
    if not specs:
        raise BadInput("name at least one domain, or use --all", subject=conn.uri)
    seen: set[str] = set()
    chosen: list[Any] = []
    for spec in specs:
        dom = lookup_domain(conn, spec)
        uuid = str(dom.UUIDString())
        if uuid not in seen:
            seen.add(uuid)
            chosen.append(dom)
    return chosen


# --- the guest agent and XML of one domain ---------------------------------------------


def _name(dom: Any) -> str | None:
    try:
        return str(dom.name())
    except Exception:  # a vanished domain: the error that follows says so
        return None


def _unavailable_codes(libvirt: Any) -> set[int]:
    names = (
        "VIR_ERR_OPERATION_INVALID",  # not running, agent not configured/connected
        "VIR_ERR_AGENT_UNRESPONSIVE",
        "VIR_ERR_AGENT_UNSYNCED",
        "VIR_ERR_ARGUMENT_UNSUPPORTED",
        "VIR_ERR_OPERATION_TIMEOUT",
        "VIR_ERR_AGENT_COMMAND_TIMEOUT",
        "VIR_ERR_NO_DOMAIN",
    )
    return {getattr(libvirt, n) for n in names if hasattr(libvirt, n)}


class LibvirtAgent:
    """The guest agent of one libvirt domain, through ``qemuAgentCommand``."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom
        self.name = _name(dom)

    def execute(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        """One agent command; its ``return`` value.

        libvirt does not pass on the agent's QMP error class, so ``error_class`` is None here.
        The reply is the guest's: it is read with the same limits as a direct socket.
        """
        libvirt = libvirt_module()
        libvirt_qemu = libvirt_qemu_module()
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        # libvirt takes whole seconds; our own deadline (trim.call_with_deadline) is exact.
        seconds = max(1, math.ceil(timeout))
        log.debug("%s: %s (libvirt, %d s)", self.name, command, seconds)
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(message), seconds, 0)
        except libvirt.libvirtError as exc:
            text = error_text(exc)
            if error_code(exc) in _unavailable_codes(libvirt):
                raise AgentUnavailable(text, subject=_name(self.dom)) from exc
            raise AgentCommandFailed(
                f"{command}: {text}",
                subject=_name(self.dom),
                command=command,
            ) from exc
        try:
            doc = loads_reply(reply if isinstance(reply, str | bytes) else "")
        except ReplyRejected as exc:
            raise AgentCommandFailed(
                f"{command}: refused the reply: {exc}", subject=_name(self.dom), command=command
            ) from exc
        if not isinstance(doc, dict):
            raise AgentCommandFailed(
                f"{command}: unreadable reply {reply!r:.80}",
                subject=_name(self.dom),
                command=command,
            )
        return doc.get("return")

    def fstrim(self, minimum: int, timeout: float) -> FstrimResult:
        ret = self.execute("guest-fstrim", {"minimum": minimum}, timeout)
        return parse_fstrim(ret, self.name)

    def exec_status(self, pid: int, *, timeout: float) -> ExecStatus:
        ret = self.execute("guest-exec-status", {"pid": pid}, timeout)
        return parse_exec_status(ret, self.name)

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus:
        """guest-exec ``path args`` and wait (``timeout``, all told) for it to exit."""
        deadline = time.monotonic() + timeout
        started = self.execute(
            "guest-exec", {"path": path, "arg": args, "capture-output": True}, timeout
        )
        pid = parse_exec_pid(started, self.name)
        return wait_for_exec(self, pid, deadline, what=path, subject=self.name)


def fetch_domain_xml(dom: Any, inactive: bool = False, secure: bool = False) -> str:
    """The domain's XML (live, or ``inactive``: the persistent definition)."""
    libvirt = libvirt_module()
    flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
        libvirt.VIR_DOMAIN_XML_SECURE if secure else 0
    )
    try:
        return str(dom.XMLDesc(flags))
    except libvirt.libvirtError as exc:
        raise EnvironmentProblem(
            f"cannot read the domain XML: {error_text(exc)}", subject=_name(dom)
        ) from exc
