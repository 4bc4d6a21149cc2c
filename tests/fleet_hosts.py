"""Several independent libvirtd instances on this one machine, and an sshd to reach them by.

Each "host" is its own virtlogd + libvirtd under tests/reaper.py (the child subreaper,
see there), started by ``unshare --mount`` in a mount namespace of its own where
``/run``, ``/etc/libvirt``, ``/var/lib/libvirt`` and ``/var/log/libvirt`` are bind mounts
of the host's temp directory. So each daemon has its own sockets, pid files
(``/run/libvirtd.pid``, ``/run/virtlogd.pid``), domain definitions, state and logs, and
sees neither the session's ``qemu:///system`` daemon nor the others; ``/var/cache/libvirt``
(QEMU's capability cache) stays shared, so no daemon re-probes QEMU. The unix socket is
reachable from outside as ``ROOT/run/libvirt/libvirt-sock``. A host started with
``tcp_port`` also listens on 127.0.0.1:PORT with ``auth_tcp = "none"`` (tests only).

The mount namespace dies with its last process, so there is nothing to unmount: stopping
the reaper (by the PID we started) stops both daemons and their QEMUs.

:class:`SshServer` is an sshd on a loopback port with its own config, host key and a
client key made here, for ``qemu+ssh://`` and Ansible's ssh connection.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services import Daemons, libvirtd_answers

if TYPE_CHECKING:
    from test_live_libvirt import LabDomain

REAPER = Path(__file__).with_name("reaper.py")
# What each namespace gets of its own (bind mounts of ROOT/<name>).
PRIVATE = {
    "run": "/run",
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
}


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FleetHost:
    """One libvirtd in its own mount namespace."""

    name: str
    root: Path
    tcp_port: int | None
    daemons: Daemons = field(default_factory=Daemons)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt" / "libvirt-sock"

    @property
    def local_uri(self) -> str:
        """The unix-socket URI from this machine: what the host's own admin would use."""
        return f"qemu:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        assert self.tcp_port is not None
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    def pid(self, name: str) -> int:
        return next(pid for n, pid in self.daemons.started if n == name)

    def stop(self) -> None:
        # A stopped (SIGSTOP) libvirtd would never see the SIGTERM the reaper forwards.
        for name, pid in self.daemons.started:
            if name == "libvirtd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.daemons.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _libvirtd_conf(tcp_port: int | None) -> str:
    lines = ['unix_sock_group = "root"', 'unix_sock_rw_perms = "0700"', "listen_tls = 0"]
    if tcp_port is not None:
        lines += [
            "listen_tcp = 1",
            'listen_addr = "127.0.0.1"',  # loopback only
            f'tcp_port = "{tcp_port}"',
            'auth_tcp = "none"',  # tests only: nothing but this machine can reach it
        ]
    return "\n".join(lines) + "\n"


def start_host(name: str, *, tcp_port: int | None = None, timeout: float = 90.0) -> FleetHost:
    """Start one libvirtd (and its virtlogd) in a namespace of its own; wait until it answers."""
    root = Path(tempfile.mkdtemp(prefix=f"vmtrim-fleet-{name}-"))
    host = FleetHost(name, root, tcp_port)
    for sub in PRIVATE:
        (root / sub).mkdir()
    (root / "run" / "libvirt").mkdir()
    (root / "lib" / "qemu").mkdir()
    for sub in ("qemu", "storage", "secrets", "nwfilter"):
        (root / "etc" / sub).mkdir()
    (root / "etc" / "libvirtd.conf").write_text(_libvirtd_conf(tcp_port))
    mounts = " && ".join(f"mount --bind {root / sub} {target}" for sub, target in PRIVATE.items())
    args = "--listen" if tcp_port is not None else ""
    script = f"{mounts} && exec {sys.executable} {REAPER} {args}"
    reaper = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    host.daemons.started.append(("reaper", reaper.pid))
    host.daemons.process = reaper
    host.daemons.uri = host.local_uri
    deadline = time.monotonic() + timeout
    try:
        assert reaper.stdout is not None
        for item in reaper.stdout.readline().split():
            daemon, _, pid = item.partition("=")
            host.daemons.started.insert(0, (daemon, int(pid)))
        if not any(n == "libvirtd" for n, _ in host.daemons.started):
            raise RuntimeError(f"{name}: the reaper did not start libvirtd (see {root}/log)")
        while not libvirtd_answers(host.local_uri):
            if time.monotonic() > deadline or reaper.poll() is not None:
                log = root / "log" / "vmtrim-tests-libvirtd.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"{name}: no answer from libvirtd in {timeout:.0f} s\n{tail}")
            time.sleep(0.3)
    except BaseException:
        host.stop()
        raise
    return host


@dataclass
class SshServer:
    """sshd on 127.0.0.1:PORT with its own config and host key; root logs in with ``key``."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    def libvirt_uri(self, host: FleetHost) -> str:
        """``qemu+ssh://`` to ``host``'s socket; libvirt runs nc/virt-ssh-helper over ssh."""
        return (
            f"qemu+ssh://root@127.0.0.1:{self.port}/system?socket={host.socket}"
            f"&keyfile={self.key}&no_verify=1"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # no_verify=1 lets ssh add this port's host key to root's known_hosts: take it out.
        subprocess.run(
            ["ssh-keygen", "-R", f"[127.0.0.1]:{self.port}"], capture_output=True, check=False
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_sshd(timeout: float = 20.0) -> SshServer:
    root = Path(tempfile.mkdtemp(prefix="vmtrim-sshd-"))
    root.chmod(0o700)
    for key in ("host_ed25519", "id_ed25519"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True
        )
    shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    process = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
        stderr=(root / "sshd.log").open("wb"),
    )
    server = SshServer(root, port, process)
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")
        time.sleep(0.1)


def refill(guest: LabDomain, mib: int) -> None:
    """Write ``mib`` MiB in a lab guest's /mnt and delete them again (through guest-exec):
    freed in the guest, still allocated on the host until the next trim."""
    script = (
        f"dd if=/dev/urandom of=/mnt/refill bs=1M count={mib} 2>/dev/null"
        " && sync && rm /mnt/refill && sync"
    )
    started = guest.agent(
        {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script]}}
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = guest.agent({"execute": "guest-exec-status", "arguments": {"pid": started["pid"]}})
        if status.get("exited"):
            if status.get("exitcode") != 0:
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                raise RuntimeError(f"{guest.name}: refill failed: {err}")
            return
        time.sleep(0.5)
    raise RuntimeError(f"{guest.name}: refill did not finish")
