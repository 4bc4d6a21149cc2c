"""Run virtlogd and libvirtd in the foreground under a child subreaper.

On these machines PID 1 does not reap orphans. libvirt daemonizes each QEMU it
starts, so a QEMU that exits is reparented to PID 1 and stays a zombie; libvirt
then sees the PID alive and waits ~30 s in every destroy and capability probe
(seen here: libvirtd stopped answering `virsh version` for minutes). With
PR_SET_CHILD_SUBREAPER those orphans are reparented to this process instead,
which reaps them. On SIGTERM it stops both daemons and exits.

Usage: python reaper.py [LIBVIRTD-ARGS...]   (prints "virtlogd=PID libvirtd=PID" once both
are up; any arguments go to libvirtd, e.g. ``--listen`` for tests/fleet_hosts.py)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"


LOG_DIR = "/var/log/libvirt"


def spawn(argv: list[str]) -> int:
    """Start argv with its output in LOG_DIR/vmtrim-tests-NAME.log (libvirtd is chatty)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            log = os.open(
                f"{LOG_DIR}/vmtrim-tests-{os.path.basename(argv[0])}.log",
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o600,
            )
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    return pid


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 3
    daemons: dict[int, str] = {}

    def forward(signum: int, _frame: object) -> None:
        for pid in list(daemons):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    # virtlogd first: libvirtd connects to its socket for every domain it starts.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(VIRTLOGD_SOCKET)
    daemons[spawn(["virtlogd"])] = "virtlogd"
    deadline = time.monotonic() + 20
    while not os.path.exists(VIRTLOGD_SOCKET) and time.monotonic() < deadline:
        time.sleep(0.05)
    daemons[spawn(["libvirtd", *sys.argv[1:]])] = "libvirtd"
    print(" ".join(f"{name}={pid}" for pid, name in daemons.items()), flush=True)

    while daemons:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        name = daemons.pop(pid, None)
        if name is not None:
            print(f"reaper: {name} exited with status {status}", file=sys.stderr, flush=True)
            forward(signal.SIGTERM, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
