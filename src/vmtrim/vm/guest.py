"""Run the lab guest directly under QEMU: command line, process, QMP, serial log.

A guest talks to the host on two channels:

* the **serial console**, written by QEMU to ``serial.log``: everything the
  kernel and init print. It is for people, and its tail goes into every
  boot or timeout error;
* the virtio-serial port **org.vmtrim.ctl**, a unix socket QEMU serves and
  the host connects to. The guest's init writes one ``VMTRIM step=...`` line
  per step there and, where the host must measure, blocks reading one line
  ("go") from it. A guest write blocks until the host is connected, and a
  host write waits in the socket until the guest reads, so neither side can
  miss the other. (Kernel messages never interleave with these lines, as
  they can on the console.)

Every QEMU started here is registered in :data:`LIVE` until it is gone;
:func:`stop_all` (called from the SIGINT/SIGTERM handler of
:func:`cleanup_on_signals` and at exit) kills each by its PID. libvirt
domains register there too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, Self

from vmtrim._util.versions import (
    QEMU,
    Version,
    format_version,
    from_qmp,
    installed_qemu_version,
    machine_version,
)
from vmtrim.channels.qmp import FstrimResult, SyncGuestAgent, SyncMonitor, parse_blockstats
from vmtrim.errors import BadInput, EnvironmentProblem, GuestFailed
from vmtrim.lab import Appliance

BUSES = ("ide", "sata", "virtio-scsi", "virtio-blk")
FORMATS = ("qcow2", "raw")
DISCARDS = ("unmap", "ignore")
CTL_PORT = "org.vmtrim.ctl"
AGENT_PORT = "org.qemu.guest_agent.0"

# --- cleanup of everything we started -------------------------------------------------


class Stoppable(Protocol):
    def stop(self) -> None: ...


LIVE: set[Stoppable] = set()
_LIVE_LOCK = threading.Lock()
# Set once an interrupt stops everything: a guest that is still starting in another
# thread must not carry on as if nothing happened.
STOPPING = threading.Event()


def register(thing: Stoppable) -> None:
    with _LIVE_LOCK:
        LIVE.add(thing)


def unregister(thing: Stoppable) -> None:
    with _LIVE_LOCK:
        LIVE.discard(thing)


def stop_all() -> None:
    """Stop every VM and domain this process started and has not stopped yet."""
    STOPPING.set()
    with _LIVE_LOCK:
        things = list(LIVE)
    for thing in things:
        with contextlib.suppress(Exception):
            thing.stop()


atexit.register(stop_all)

# A signal that lands between starting a VM and recording its handle would leak the
# VM, so the handler below only notes it inside `launching()` and raises at its end.
_critical = 0
_deferred = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _deferred
    if _critical:
        _deferred = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def launching() -> Iterator[None]:
    """Start a VM and record its handle in here; a Ctrl-C/SIGTERM waits until the end."""
    global _critical, _deferred
    main = threading.current_thread() is threading.main_thread()
    if main:
        _critical += 1
    try:
        yield
    finally:
        if main:
            _critical -= 1
            if not _critical and _deferred:
                _deferred = False
                raise KeyboardInterrupt
    if STOPPING.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (outside `launching`); stop all VMs then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOPPING.clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        stop_all()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- what to boot ------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    format: str  # qcow2 | raw
    bus: str  # ide | sata | virtio-scsi | virtio-blk
    discard: str  # unmap | ignore

    def __post_init__(self) -> None:
        for value, allowed in ((self.bus, BUSES), (self.format, FORMATS), (self.discard, DISCARDS)):
            if value not in allowed:
                raise BadInput(
                    f"{value!r} is not one of {', '.join(allowed)}", subject=str(self.path)
                )


@dataclass(frozen=True)
class GuestSpec:
    appliance: Appliance
    scenario: dict[str, str] = field(default_factory=dict)  # vmtrim.KEY=VALUE on the cmdline
    disk: DiskSpec | None = None
    agent: bool = False
    control: bool = True  # the org.vmtrim.ctl port; the KVM probe boots without one
    machine: str = "pc"
    accel: str = "tcg"
    memory_mib: int = 512
    extra_cmdline: tuple[str, ...] = ()  # more kernel parameters, e.g. for debugging

    def kernel(self) -> Path:
        """PVH needs machine type 4.0 or later (pvh_enabled); older ones boot the bzImage."""
        version = machine_version(self.machine)
        if version is not None and version < (4, 0):
            return self.appliance.bzimage
        return self.appliance.kernel

    def cmdline(self) -> str:
        # panic=-1 reboots on a panic, and -no-reboot turns that into QEMU exiting.
        words = ["console=ttyS0", "panic=-1", "quiet"]
        words += [f"vmtrim.{k}={v}" for k, v in self.scenario.items()]
        words += self.extra_cmdline
        return " ".join(words)


def _blockdev(**options: object) -> str:
    return json.dumps(options, separators=(",", ":"))


def disk_args(disk: DiskSpec) -> list[str]:
    """-blockdev and -device arguments that put ``disk`` on its bus with its discard setting."""
    args = [
        "-blockdev",
        _blockdev(
            driver="file",
            filename=str(disk.path),
            **{"node-name": "disk0-file"},
            discard=disk.discard,
        ),
        "-blockdev",
        _blockdev(
            driver=disk.format, file="disk0-file", **{"node-name": "disk0"}, discard=disk.discard
        ),
    ]
    if disk.bus == "ide":  # the board's own IDE controller (piix on pc, ahci on q35)
        args += ["-device", "ide-hd,drive=disk0,bus=ide.0"]
    elif disk.bus == "sata":
        args += ["-device", "ahci,id=ahci0", "-device", "ide-hd,drive=disk0,bus=ahci0.0"]
    elif disk.bus == "virtio-scsi":
        args += [
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-device",
            "scsi-hd,drive=disk0,bus=scsi0.0",
        ]
    else:
        args += ["-device", "virtio-blk-pci,drive=disk0"]
    return args


@dataclass(frozen=True)
class RunPaths:
    workdir: Path

    @property
    def serial(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def stderr(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def qmp(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def ctl(self) -> Path:
        return self.workdir / "ctl.sock"

    @property
    def agent(self) -> Path:
        return self.workdir / "qga.sock"


def qemu_argv(spec: GuestSpec, paths: RunPaths) -> list[str]:
    accel = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg"]
    argv = [
        QEMU,
        "-name",
        "vmtrim-lab",
        "-machine",
        spec.machine,
        *accel,
        "-m",
        str(spec.memory_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(spec.kernel()),
        "-initrd",
        str(spec.appliance.initrd),
        "-append",
        spec.cmdline(),
        "-chardev",
        f"file,id=serial0,path={paths.serial}",
        "-serial",
        "chardev:serial0",
        "-chardev",
        f"socket,id=qmp,path={paths.qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if spec.control or spec.agent:
        argv += ["-device", "virtio-serial-pci,id=vser0"]
    if spec.control:
        argv += [
            "-chardev",
            f"socket,id=ctl,path={paths.ctl},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=ctl,name={CTL_PORT}",
        ]
    if spec.agent:
        argv += [
            "-chardev",
            f"socket,id=qga,path={paths.agent},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=qga,name={AGENT_PORT}",
        ]
    if spec.disk is not None:
        argv += disk_args(spec.disk)
    return argv


# --- the serial log and the control channel -----------------------------------------------


def serial_tail(path: Path, lines: int = 6, width: int = 160) -> str:
    """The last non-empty lines of a console log, joined with ' | ' for one error line.

    A kernel panic's headline comes first even when its stack trace fills the tail.
    """
    try:
        data = path.read_bytes()[-65536:].decode(errors="replace")
    except OSError:
        return "(no serial log)"
    kept = [ln.strip()[:width] for ln in data.replace("\r", "").splitlines() if ln.strip()]
    tail = kept[-lines:]
    panics = [ln for ln in kept if "Kernel panic" in ln]
    if panics and panics[-1] not in tail:
        tail = [panics[-1], "...", *tail[-(lines - 2) :]]
    return " | ".join(tail) or "(serial log is empty)"


_WORD = re.compile(r"(\w+)=(\S*)")


def parse_status(line: str) -> dict[str, str] | None:
    """``VMTRIM step=written bytes=1 message=free text`` -> dict; None if not a status line."""
    if not line.startswith("VMTRIM "):
        return None
    body = line[len("VMTRIM ") :]
    message = None
    if " message=" in f" {body}":
        body, _, message = f" {body}".partition(" message=")
    fields = dict(_WORD.findall(body))
    if message is not None:
        fields["message"] = message.strip()
    return fields if "step" in fields else None


class ControlChannel:
    """Line protocol on the org.vmtrim.ctl socket; see the module docstring.

    ``failure(what)`` builds the error for a guest that stopped answering (with the
    serial tail and whatever the runner knows about why the VM is gone).
    """

    def __init__(
        self, sock: socket.socket, failure: Callable[[str], GuestFailed], alive: Callable[[], bool]
    ) -> None:
        self._sock = sock
        self._buffer = b""
        self._fail = failure
        self._alive = alive
        self.seen: dict[str, dict[str, str]] = {}

    @classmethod
    def connect(
        cls,
        path: Path,
        *,
        failure: Callable[[str], GuestFailed],
        alive: Callable[[], bool],
        timeout: float = 30.0,
    ) -> ControlChannel:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock, failure, alive)
            except OSError as exc:
                sock.close()
                if not alive() or time.monotonic() > deadline:
                    raise failure(f"cannot connect to the control port: {exc.strerror}") from exc
                time.sleep(0.05)

    def _readline(self, deadline: float, waiting_for: str) -> str:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"the guest did not report '{waiting_for}' in time")
            self._sock.settimeout(min(0.5, remaining))
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                if not self._alive():
                    raise self._fail(f"the VM stopped before '{waiting_for}'") from None
                continue
            except OSError as exc:
                raise self._fail(f"the control port failed before '{waiting_for}': {exc}") from exc
            if not chunk:
                raise self._fail(f"the VM stopped before '{waiting_for}'")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace").strip()

    def expect(self, step: str, timeout: float) -> dict[str, str]:
        """Read status lines until ``step``; a guest ``error`` line raises GuestFailed."""
        deadline = time.monotonic() + timeout
        while True:
            fields = parse_status(self._readline(deadline, step))
            if fields is None:
                continue
            self.seen[fields["step"]] = fields
            if fields["step"] == "error":
                raise self._fail(f"the guest failed: {fields.get('message', '?')}")
            if fields["step"] == step:
                return fields

    def go(self) -> None:
        try:
            self._sock.sendall(b"go\n")
        except OSError as exc:
            raise self._fail(f"cannot send to the guest: {exc}") from exc

    def close(self) -> None:
        self._sock.close()


# --- a running guest -------------------------------------------------------------------------


class Guest(Protocol):
    """What a verify cell needs from a running lab guest, whatever runs it."""

    serial_log: Path

    @property
    def ctl(self) -> ControlChannel: ...
    def agent_fstrim(self, minimum: int = 0) -> FstrimResult: ...
    def wait_exit(self, timeout: float) -> None: ...
    def info(self) -> dict[str, Any]: ...


# How a cell starts a guest: (spec, workdir, subject) -> a context manager.
Boot = Callable[[GuestSpec, Path, str], contextlib.AbstractContextManager[Guest]]


def make_workdir() -> Path:
    # Short, so the unix socket paths stay under the 108-byte limit.
    return Path(tempfile.mkdtemp(prefix="vmtrim-"))


class GuestBase:
    """Lifecycle shared by the runners: registered in LIVE while it may run, always stopped.

    Subclasses implement ``start`` (which sets ``_ctl`` when the spec has a control
    port), ``_stop`` and ``alive``.
    """

    def __init__(
        self, spec: GuestSpec, workdir: Path, *, subject: str = "vm", connect_timeout: float = 30.0
    ) -> None:
        self.spec = spec
        self.paths = RunPaths(workdir)
        self.serial_log = self.paths.serial
        self.subject = subject
        self.connect_timeout = connect_timeout
        self._ctl: ControlChannel | None = None

    def __enter__(self) -> Self:
        register(self)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _connect_ctl(self) -> None:
        if not self.spec.control:
            return
        self._ctl = ControlChannel.connect(
            self.paths.ctl, failure=self.failure, alive=self.alive, timeout=self.connect_timeout
        )

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            if self._ctl is not None:
                self._ctl.close()
            unregister(self)

    def exit_detail(self) -> str:
        """Why the VM is gone, if the runner knows (e.g. QEMU's last stderr line)."""
        return ""

    def failure(self, what: str) -> GuestFailed:
        detail = self.exit_detail()
        return GuestFailed(
            f"{what}{f' ({detail})' if detail else ''}; serial log: {serial_tail(self.serial_log)}",
            subject=self.subject,
        )

    @property
    def ctl(self) -> ControlChannel:
        if self._ctl is None:
            raise EnvironmentProblem("this guest has no control port", subject=self.subject)
        return self._ctl


class DirectGuest(GuestBase):
    """A lab guest under a QEMU process this object starts, and always stops.

    Use as a context manager. The caller owns ``workdir`` (sockets, logs, images).
    ``rewrite_argv`` receives the lab's command line and returns the one to run (e.g.
    a user's disk options, or that line after ``vmtrim fix``); the channels stay.
    """

    def __init__(
        self,
        spec: GuestSpec,
        workdir: Path,
        *,
        subject: str = "vm",
        connect_timeout: float = 30.0,
        rewrite_argv: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        super().__init__(spec, workdir, subject=subject, connect_timeout=connect_timeout)
        self.rewrite_argv = rewrite_argv
        self.process: subprocess.Popen[bytes] | None = None
        self._info: dict[str, Any] = {}

    def start(self) -> None:
        if shutil.which(QEMU) is None:
            raise EnvironmentProblem(f"{QEMU} is not installed", subject=self.subject)
        argv = qemu_argv(self.spec, self.paths)
        if self.rewrite_argv is not None:
            argv = self.rewrite_argv(argv)
        with open(self.paths.stderr, "wb") as err, launching():
            # Own session: a Ctrl-C on the terminal reaches vmtrim, which stops QEMU itself.
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        self._connect_ctl()
        self._query_info()

    def _query_info(self) -> None:
        try:
            with SyncMonitor(
                str(self.paths.qmp), timeout=self.connect_timeout, subject=self.subject
            ) as qmp:
                version = qmp.execute("query-version")
                machines = qmp.execute("query-machines")
                kvm = qmp.execute("query-kvm")
        except EnvironmentProblem as exc:
            raise self.failure(f"QMP did not answer: {exc.message}") from exc
        self._info = {
            "qemu_version": format_version(from_qmp(version)),
            "machine": _resolve_machine(self.spec.machine, machines),
            "accel": "kvm" if isinstance(kvm, dict) and kvm.get("enabled") else "tcg",
        }

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _stop(self) -> None:
        """Kill our QEMU by its PID (it is a throwaway guest) and reap it."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def exit_detail(self) -> str:
        if self.process is None or self.process.poll() is None:
            return ""
        err = self.paths.stderr.read_text(errors="replace").strip().splitlines()
        return f"QEMU exited with status {self.process.returncode}" + (
            f": {err[-1]}" if err else ""
        )

    def agent_fstrim(self, minimum: int = 0) -> FstrimResult:
        with SyncGuestAgent(
            str(self.paths.agent), timeout=30.0, subject=f"{self.subject} agent"
        ) as ga:
            return ga.fstrim(minimum)

    def blockstats(self) -> dict[str, Any]:
        """query-blockstats of the test disk: what reached QEMU's block layer."""
        with SyncMonitor(str(self.paths.qmp), timeout=10.0, subject=self.subject) as qmp:
            stats = qmp.execute("query-blockstats", {"query-nodes": True})
        for entry in parse_blockstats(stats, self.subject):
            if entry.node_name == "disk0":
                return {k: getattr(entry, k) for k in ("unmap_bytes", "unmap_operations")}
        return {}

    def wait_exit(self, timeout: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.failure(f"the guest did not power off within {timeout:g} s") from None


def _resolve_machine(name: str, machines: object) -> str:
    """'pc' -> 'pc-i440fx-7.2': the versioned type behind an alias."""
    for m in machines if isinstance(machines, list) else []:
        if isinstance(m, dict) and name in (m.get("name"), m.get("alias")):
            return str(m.get("name"))
    return name


def qemu_version() -> Version:
    """The installed QEMU's version; EnvironmentProblem when it cannot run."""
    version = installed_qemu_version()
    if version is None:
        raise EnvironmentProblem(f"{QEMU} cannot run or print its version", subject=QEMU)
    return version
