"""Start and stop the real libvirtd + virtlogd for the tests (as root, no systemd).

The tests meet the same libvirtd a user runs. We start the daemons ourselves and
stop them by the PID we started; a daemon that was already running is used as it
is and left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

URI = "qemu:///system"
RUNTIME_DIRS = ("/var/log/libvirt", "/var/lib/libvirt/qemu", "/var/cache/libvirt", "/run/libvirt")


def libvirtd_answers(uri: str = URI, timeout: float = 10.0) -> bool:
    try:
        result = subprocess.run(
            ["virsh", "-c", uri, "version"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return False
    return result.returncode == 0


def _read_pid(pidfile: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    raise RuntimeError(f"{pidfile}: the daemon wrote no PID file")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


@dataclass
class Daemons:
    uri: str = URI
    started: list[tuple[str, int]] = field(default_factory=list)

    def stop(self) -> None:
        for name, pid in reversed(self.started):
            if not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            print(f"services: stopped {name} (pid {pid})")
        self.started.clear()


def start_libvirtd(timeout: float = 60.0) -> Daemons:
    """Start virtlogd and libvirtd unless a libvirtd already answers on qemu:///system."""
    daemons = Daemons()
    if libvirtd_answers():
        return daemons
    # A libvirtd that is alive but slow to answer (busy, or still starting in another
    # test session) must not get a twin: the twin unlinks its sockets and then fails
    # on the driver pid files, which leaves no libvirtd reachable at all.
    if _running("libvirtd"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if libvirtd_answers():
                return daemons
            time.sleep(0.5)
        raise RuntimeError(f"a libvirtd is running but does not answer on {URI}")
    if os.geteuid() != 0:
        raise RuntimeError("starting libvirtd needs root")
    for tool in ("virtlogd", "libvirtd", "virsh"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (run: sh bootstrap.sh install)")
    for directory in RUNTIME_DIRS:
        Path(directory).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    try:
        for name in ("virtlogd", "libvirtd"):
            pidfile = Path(f"/run/vmtrim-tests-{name}.pid")
            pidfile.unlink(missing_ok=True)
            subprocess.run([name, "-d", "-p", str(pidfile)], check=True, timeout=timeout)
            daemons.started.append((name, _read_pid(pidfile, deadline)))
        while not libvirtd_answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not answer on {URI} within {timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:
        daemons.stop()
        raise
    return daemons
