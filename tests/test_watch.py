"""`vmtrim watch` against the real libvirtd: a `virsh blockcopy` of a lab guest's disk
is followed by a trim of that guest, recorded with the event as its reason.

The copy (a disk move) carries every block the old image held, the 64 MiB the guest
deleted included; only a trim gives them back. The policy includes only this module's
guests: other guests on the shared libvirtd see events too, and are not ours.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

import lab_domains
from helpers import du_bytes
from lab_domains import OURS
from test_live_libvirt import Lab
from vmtrim.run.watch import describe_block_job, describe_lifecycle

lab = lab_domains.lab  # the shared module-scoped fixture: this module's guests

MiB = 1024 * 1024
SETTLE = 2


def read_line(stream: Any, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def start_watch(tmp: Path) -> subprocess.Popen[str]:
    """`vmtrim watch --json` on this module's guests, once it says it is watching."""
    policy = tmp / "policy.toml"
    policy.write_text(f'include = ["{OURS}*"]\nsettle = {SETTLE}\n')
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmtrim",
            "watch",
            "--policy",
            str(policy),
            "--db",
            str(tmp / "history.db"),
            "--lock",
            str(tmp / "run.lock"),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stderr is not None
    assert "watching qemu:///system" in read_line(watcher.stderr, 60)
    return watcher


def stop_watch(watcher: subprocess.Popen[str]) -> str:
    """SIGTERM; its stderr. It must stop by itself, cleanly."""
    watcher.send_signal(signal.SIGTERM)
    try:
        _, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0
    assert err.strip().endswith("stopped (SIGTERM)")
    return err


@pytest.mark.vm
@pytest.mark.libvirt
def test_blockcopy_is_followed_by_a_recorded_trim(lab: Lab, tmp_path: Path) -> None:
    guest = lab.start("watch", write_mib=64)
    guest.until_deleted()
    db = tmp_path / "history.db"
    watcher = start_watch(tmp_path)
    try:
        assert watcher.stdout is not None
        copy = guest.workdir / "copy.qcow2"
        moved = subprocess.run(
            [
                "virsh",
                "-c",
                "qemu:///system",
                "blockcopy",
                guest.name,
                "sda",
                str(copy),
                "--wait",
                "--pivot",
                "--transient-job",
                "--format",
                "qcow2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert moved.returncode == 0, moved.stderr
        # The bound: the trim comes within settle + 30 s of the finished copy.
        line = read_line(watcher.stdout, SETTLE + 30)
        assert line, "no trim within settle + 30 s"
        doc = json.loads(line)
        du_after = du_bytes(copy)
    finally:
        stop_watch(watcher)

    assert doc["schema"] == "vmtrim.watch/1"
    assert (doc["domain"], doc["status"]) == (guest.name, "trimmed")
    assert doc["trigger"] == "block job copy on sda completed"
    [disk] = doc["disks"]
    assert disk["source"] == str(copy)  # the new image, after the pivot
    assert disk["allocated_after"] == du_after
    assert disk["reclaimed"] >= 0.99 * 64 * MiB

    with sqlite3.connect(db) as conn:
        [(kind, trigger, domain, status, reclaimed)] = conn.execute(
            "SELECT runs.kind, runs.trigger, r.domain, r.status, r.reclaimed"
            " FROM runs JOIN domain_results r ON r.run_id = runs.id"
        ).fetchall()
    assert (kind, trigger) == ("watch", "block job copy on sda completed")
    assert (domain, status, reclaimed) == (guest.name, "trimmed", disk["reclaimed"])


@pytest.mark.vm
@pytest.mark.libvirt
def test_a_started_domain_is_trimmed_once_its_agent_connects(lab: Lab, tmp_path: Path) -> None:
    watcher = start_watch(tmp_path)
    try:
        assert watcher.stdout is not None
        guest = lab.start("boot", write_mib=8)
        line = read_line(watcher.stdout, 240)  # a TCG boot, then the agent, then settle
        assert line, "no trim after the start"
    finally:
        err = stop_watch(watcher)
    doc = json.loads(line)
    assert doc["domain"] == guest.name
    assert doc["trigger"] == "domain started; guest agent connected"
    assert doc["status"] == "trimmed", doc["reason"]
    assert f"{guest.name}: domain started; trim once its guest agent connects" in err


def test_which_events_mean_a_trim() -> None:
    # libvirt-python's own constants: the events the watch reacts to, and the ones it lets be.
    assert describe_lifecycle(
        libvirt, libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED
    ) == ("migration into this host finished")
    assert describe_lifecycle(
        libvirt, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED
    ) == ("domain restored")
    # An incoming migration starts before it is over: no trim yet.
    started_migrated = libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED
    assert describe_lifecycle(libvirt, libvirt.VIR_DOMAIN_EVENT_STARTED, started_migrated) is None
    assert describe_lifecycle(libvirt, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0) is None
    commit = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    assert describe_block_job(libvirt, "vda", commit, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED) == (
        "block job active commit on vda completed"
    )
    ready = libvirt.VIR_DOMAIN_BLOCK_JOB_READY
    assert describe_block_job(libvirt, "vda", commit, ready) is None
    pull = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
    assert describe_block_job(libvirt, "vda", pull, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED) is None


class Proxy:
    """A unix-socket relay to libvirtd's socket that the test can cut and restore.

    The watch connects through it, so dropping the link hurts no one else using the
    shared libvirtd: the daemon and the client are real, only the wire is ours.
    """

    def __init__(self, path: Path, target: str = "/var/run/libvirt/libvirt-sock") -> None:
        self.path, self.target = path, target
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def start(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(8)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.path.unlink(missing_ok=True)
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets.clear()


def wait_for(stream: Any, text: str, seconds: float) -> list[str]:
    """Lines of ``stream`` up to and including the first that contains ``text``."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = read_line(stream, max(0.1, deadline - time.monotonic()))
        if line:
            seen.append(line)
            if text in line:
                return seen
    raise AssertionError(f"no {text!r} in {seen}")


@pytest.mark.libvirt
def test_a_dropped_connection_is_retried_and_each_reconnect_logged(
    libvirtd: str, tmp_path: Path
) -> None:
    proxy = Proxy(tmp_path / "libvirt-sock")
    proxy.start()
    uri = f"qemu+unix:///system?socket={proxy.path}"
    policy = tmp_path / "policy.toml"
    policy.write_text('include = ["nothing-here-*"]\n')
    watcher = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "watch", "-c", uri, "--policy", str(policy)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        wait_for(watcher.stderr, f"watching {uri}", 60)
        proxy.stop()  # libvirtd is fine; the link to it is gone
        lost = wait_for(watcher.stderr, "next try in 2 s", 60)
        assert any(f"{uri}: connection lost" in line for line in lost), lost
        assert any("cannot connect" in line and "next try in 1 s" in line for line in lost)
        proxy.start()
        back = wait_for(watcher.stderr, "reconnected after", 60)
        assert f"vmtrim: watch: {uri}: reconnected after" in back[-1]
    finally:
        proxy.stop()
        stop_watch(watcher)
