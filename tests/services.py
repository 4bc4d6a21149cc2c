"""Start and stop the real libvirtd + virtlogd for the tests (as root, no systemd).

They run under tests/reaper.py, a child subreaper, because PID 1 here does not reap
the QEMU processes libvirt daemonizes (see reaper.py).

The tests meet the same libvirtd a user runs. We start the daemons ourselves and
stop them by the PID we started; a daemon that was already running is used as it
is and left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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
    # (name, pid) in start order; the reaper (last) is stopped first and stops the others.
    started: list[tuple[str, int]] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None

    def stop(self) -> None:
        for name, pid in reversed(self.started):
            if self.process is not None and pid == self.process.pid:
                # Our own child: wait() reaps it (a zombie would look alive to kill(0)).
                self.process.terminate()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            elif _alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            else:
                continue
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
    reaper = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("reaper.py"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemons.started.append(("reaper", reaper.pid))
    try:
        assert reaper.stdout is not None
        line = reaper.stdout.readline().split()
        for item in line:
            name, _, pid = item.partition("=")
            daemons.started.insert(0, (name, int(pid)))
        while not libvirtd_answers():
            if time.monotonic() > deadline or reaper.poll() is not None:
                raise RuntimeError(f"libvirtd did not answer on {URI} within {timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:
        daemons.stop()
        raise
    daemons.process = reaper
    return daemons
