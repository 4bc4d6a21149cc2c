"""``vmtrim trim`` over five libvirt hosts: three live ones over three real transports, two dead.

The hosts are independent libvirtd instances (tests/fleet_hosts.py: each in its own mount
namespace, with its own sockets, state, definitions and logs), each running one lab guest
that wrote and deleted WRITE_MIB MiB on an ext4 mounted without discard, so only the
host-driven trim gives the space back. They are reached as a user would reach them:

* ``a``: the unix socket (``qemu:///system?socket=...``), measured with ``du``;
* ``b``: ``qemu+tcp://127.0.0.1:PORT/system`` (loopback only, auth none: tests only);
* ``c``: ``qemu+ssh://root@127.0.0.1:PORT/system?socket=...`` through our own sshd and a
  key made here; its guest's disk is a volume of a dir storage pool
  (``<disk type='volume'>``), measured through the storage-volume API;
* a TCP port where nothing listens;
* ``d``: a libvirtd that is SIGSTOPped: the kernel still accepts the TCP connection, and
  then nothing answers.

Every daemon is stopped by the PID this module started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from fleet_hosts import FleetHost, SshServer, free_port, start_host, start_sshd
from helpers import du_bytes, vmtrim
from test_live_libvirt import Lab, LabDomain, domain_xml, make_image
from vmtrim.lab import Appliance

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
MiB = 1024 * 1024
WRITE_MIB = 32
# Short enough to keep the test quick; the default is 15 s.
CONNECT_TIMEOUT = 8.0


@dataclass
class Live:
    host: FleetHost
    uri: str  # how vmtrim reaches it
    conn: Any  # the host's own admin connection (its unix socket)
    lab: Lab
    guest: LabDomain

    pool: str | None = None  # the guest's disk is this pool's volume disk.qcow2

    def own_allocation(self) -> int:
        """The host's own figure for the guest's disk, asked on its local socket: the
        storage pool's for a volume, else the domain's block info."""
        if self.pool is not None:
            vol = self.conn.storagePoolLookupByName(self.pool).storageVolLookupByName("disk.qcow2")
            return int(vol.info()[2])
        return int(self.conn.lookupByName(self.guest.name).blockInfo("sda")[1])

    @property
    def measured_by(self) -> str:
        if self.uri == self.host.local_uri:
            return "du"
        return "storageVolume" if self.pool else "blockInfo"

    @property
    def source(self) -> str:
        return f"{self.pool}/disk.qcow2" if self.pool else str(self.guest.image)


def start_volume_guest(lab: Lab, tag: str) -> tuple[LabDomain, str]:
    """A lab guest whose disk is ``<disk type='volume'>`` in a dir pool of its own,
    defined as Lab.start does it (and cleaned up by lab.cleanup)."""
    name = f"vmtrim-live-{os.getpid()}-{tag}"
    workdir = Path(tempfile.mkdtemp(prefix=f"vl-{tag}-"))
    workdir.chmod(0o755)
    make_image(workdir / "disk.qcow2", 128)
    pool = f"vmtrim-{tag}"
    lab.conn.storagePoolCreateXML(  # transient: it goes with the daemon
        f"<pool type='dir'><name>{pool}</name><target><path>{workdir}</path></target></pool>", 0
    )
    xml = domain_xml(name, workdir, lab.appliance, discard=True, agent=True, write_mib=WRITE_MIB)
    disk = f"<source file='{workdir}/disk.qcow2'/>"
    assert xml.count(disk) == 1
    xml = xml.replace(disk, f"<source pool='{pool}' volume='disk.qcow2'/>").replace(
        "<disk type='file' device='disk'>", "<disk type='volume' device='disk'>"
    )
    guest = LabDomain(name, workdir, lab.conn.defineXML(xml), WRITE_MIB)
    lab.domains.append(guest)
    guest.dom.create()
    guest.connect()
    return guest, pool


@dataclass
class Fleet:
    live: list[Live]
    stopped: FleetHost
    refused_uri: str


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    server = start_sshd()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(appliance: Appliance, sshd: SshServer) -> Iterator[Fleet]:
    hosts: list[FleetHost] = []
    live: list[Live] = []
    try:
        a = start_host("a")
        hosts.append(a)
        b = start_host("b", tcp_port=free_port())
        hosts.append(b)
        c = start_host("c")
        hosts.append(c)
        d = start_host("d", tcp_port=free_port())
        hosts.append(d)
        for host, uri in ((a, a.local_uri), (b, b.tcp_uri), (c, sshd.libvirt_uri(c))):
            conn = libvirt.open(host.local_uri)
            lab = Lab(conn, appliance)
            if host is c:  # over SSH, a pool volume: measured by the storage-volume API
                guest, pool = start_volume_guest(lab, host.name)
                live.append(Live(host, uri, conn, lab, guest, pool))
            else:
                live.append(Live(host, uri, conn, lab, lab.start(host.name, write_mib=WRITE_MIB)))
        for one in live:  # the three boot together; each waits for its own guest
            one.guest.until_deleted()
        yield Fleet(live, d, f"qemu+tcp://127.0.0.1:{free_port()}/system")
    finally:
        for one in live:
            one.lab.cleanup()
            one.conn.close()
        for host in hosts:
            host.stop()


def test_trim_five_hosts_three_reclaim_two_fail_on_their_own(fleet: Fleet, tmp_path: Path) -> None:
    stopped = fleet.stopped
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(
        "# the fleet\n"
        + "".join(f"{one.uri}\n" for one in fleet.live)
        + f"{fleet.refused_uri}   # nothing listens here\n\n{stopped.tcp_uri}\n"
    )
    before = {
        one.host.name: (du_bytes(one.guest.image), one.own_allocation()) for one in fleet.live
    }
    for one in fleet.live:
        assert before[one.host.name][0] >= WRITE_MIB * MiB  # the deleted data is still there
    os.kill(stopped.pid("libvirtd"), signal.SIGSTOP)
    try:
        start = time.monotonic()
        result = vmtrim(
            "trim",
            "--hosts",
            str(hosts_file),
            "--all",
            "--json",
            "--no-history",
            "--connect-timeout",
            str(CONNECT_TIMEOUT),
        )
        elapsed = time.monotonic() - start
    finally:
        os.kill(stopped.pid("libvirtd"), signal.SIGCONT)
    assert result.returncode == 3, result.stderr  # a host failed
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.trim/1"
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert list(hosts) == [*(one.uri for one in fleet.live), fleet.refused_uri, stopped.tcp_uri]

    for one in fleet.live:
        host = hosts[one.uri]
        assert (host["status"], host["reason"]) == ("ok", None)
        [dom] = [d for d in doc["domains"] if d["host"] == one.uri]
        assert (dom["domain"], dom["status"]) == (one.guest.name, "trimmed"), dom["reason"]
        [disk] = dom["disks"]
        # vmtrim's figures are the host's own: du on the local socket's host; on the
        # remote transports libvirt's (the host's, asked on its own socket): the pool's
        # for a volume, the domain's block info otherwise.
        du_before, own_before = before[one.host.name]
        assert (disk["source"], disk["measured_by"]) == (one.source, one.measured_by)
        if one.measured_by == "du":
            assert (disk["allocated_before"], disk["allocated_after"]) == (
                du_before,
                du_bytes(one.guest.image),
            )
        else:
            assert (disk["allocated_before"], disk["allocated_after"]) == (
                own_before,
                one.own_allocation(),
            )
        assert disk["reclaimed_bytes"] >= 0.99 * WRITE_MIB * MiB
        assert du_before - du_bytes(one.guest.image) >= 0.99 * WRITE_MIB * MiB
        assert host["reclaimed_bytes"] == disk["reclaimed_bytes"]

    refused, hung = hosts[fleet.refused_uri], hosts[stopped.tcp_uri]
    assert refused["status"] == "failed" and "Connection refused" in refused["reason"]
    assert hung["status"] == "failed"
    assert f"no answer within --connect-timeout {CONNECT_TIMEOUT:g} s" in hung["reason"]
    for dead in (refused, hung):
        assert dead["seconds"] <= CONNECT_TIMEOUT + 5
        assert dead["domains"] == 0
    assert doc["fleet"]["failed_hosts"] == 2 and doc["fleet"]["trimmed"] == 3
    assert doc["fleet"]["reclaimed_bytes"] == sum(h["reclaimed_bytes"] for h in doc["hosts"])
    # In parallel: the slowest live host, or the dead host's timeout, plus the CLI's own
    # start-up (python, imports, libvirt's first connection: up to ~5 s on this loaded
    # 2-core machine), not the sum of the hosts.
    slowest = max(hosts[one.uri]["seconds"] for one in fleet.live)
    assert elapsed <= max(slowest, CONNECT_TIMEOUT) + CONNECT_TIMEOUT, (elapsed, slowest)


def test_human_output_groups_by_host_with_a_fleet_total(fleet: Fleet) -> None:
    a, b = fleet.live[0], fleet.live[1]
    result = vmtrim(
        "trim", "-c", a.uri, "-c", b.uri, "-c", fleet.refused_uri, "--all", "--no-history"
    )
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines]
    # One line per domain (piped: whole values), the host first, in the hosts' order.
    mine = [r for r in rows if r and r[0] in (a.uri, b.uri, fleet.refused_uri)]
    assert [r[0] for r in mine] == [a.uri, b.uri, fleet.refused_uri]
    assert mine[0][1:3] == [a.guest.name, "trimmed"]
    assert mine[1][1:3] == [b.guest.name, "trimmed"]
    assert mine[2][2] == "failed"
    assert any("host failed:" in line and "Connection refused" in line for line in lines)
    assert lines[-1].startswith("fleet: 3 host(s), 1 failed; 2 domain(s), 2 trimmed;")


def test_explain_over_hosts_names_ext4_already_trimmed(fleet: Fleet) -> None:
    """``--explain`` with several hosts: a trim, then a second one right after it. ext4
    trims only the block groups changed since its last trim in this mount, so the second
    reports 0 B on /mnt, and each host's lines name the cause, after the host, on the
    local socket (a) and over SSH (c, where the image is not this machine's)."""
    a, c = fleet.live[0], fleet.live[2]
    hosts = ("-c", a.uri, "-c", c.uri, "--connect-timeout", str(CONNECT_TIMEOUT))
    first = vmtrim("trim", *hosts, "--all", "--explain", "--json", "--no-history")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert [(d["host"], d["status"], d["explained"]) for d in doc["domains"]] == [
        (a.uri, "trimmed", True),
        (c.uri, "trimmed", True),
    ]
    second = vmtrim("trim", *hosts, "--all", "--explain", "--no-history")
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    for one in (a, c):
        mine = [line.strip() for line in lines if line.strip().startswith(f"{one.uri}: ")]
        assert mine == [
            f"{one.uri}: sda: why: ext4_already_trimmed: /mnt (ext4) reported 0 B trimmed:"
            " ext4 skips the block groups already trimmed since mount (nothing was freed in"
            " them since); what the first trim freed is already on the host"
        ], second.stdout


def test_audit_over_hosts_blames_only_the_dead_one(fleet: Fleet, sshd: SshServer) -> None:
    a, c = fleet.live[0], fleet.live[2]
    uris = ("-c", a.uri, "-c", c.uri, "-c", fleet.refused_uri)
    result = vmtrim("audit", *uris, "--all", "--json", "--connect-timeout", str(CONNECT_TIMEOUT))
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.audit/1"
    by_host = {h["host"]: h for h in doc["hosts"]}
    assert [by_host[u]["status"] for u in (a.uri, c.uri, fleet.refused_uri)] == [
        "ok",
        "ok",
        "failed",
    ]
    for one in (a, c):
        [disk] = [d for d in doc["disks"] if d["host"] == one.uri]
        assert (disk["domain"], disk["target"]) == (one.guest.name, "sda")
        assert (disk["source"], disk["discard"]) == (one.source, "unmap")
        # Each host answers for itself: its own libvirtd's version.
        assert by_host[one.uri]["libvirt_version"] == "9.0.0"
    assert "Connection refused" in by_host[fleet.refused_uri]["reason"]
    assert doc["fleet"]["disks"] == 2 and doc["fleet"]["failed_hosts"] == 1


def test_run_policy_over_hosts_dead_ones_cost_one_timeout(fleet: Fleet, tmp_path: Path) -> None:
    """``vmtrim run`` with the policy's connect list: the dead hosts are opened at the
    same time as the live one, so they cost one --connect-timeout (the default, 15 s),
    not one each; the JSON names them and why; exit 3."""
    a, stopped = fleet.live[0], fleet.stopped
    policy = tmp_path / "policy.toml"
    uris = [a.uri, fleet.refused_uri, stopped.tcp_uri]
    policy.write_text(f'connect = {json.dumps(uris)}\ninclude = ["{a.guest.name}"]\n')
    args = ["run", "--policy", str(policy), "--json"]
    args += ["--db", str(tmp_path / "history.db"), "--lock", str(tmp_path / "run.lock")]
    os.kill(stopped.pid("libvirtd"), signal.SIGSTOP)
    try:
        start = time.monotonic()
        result = vmtrim(*args)
        elapsed = time.monotonic() - start
    finally:
        os.kill(stopped.pid("libvirtd"), signal.SIGCONT)
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    failed = {h["host"]: h["reason"] for h in doc["failed_hosts"]}
    assert list(failed) == [fleet.refused_uri, stopped.tcp_uri]
    assert "Connection refused" in failed[fleet.refused_uri]
    assert "no answer within --connect-timeout 15 s" in failed[stopped.tcp_uri]
    [dom] = doc["domains"]
    assert (dom["domain"], dom["uri"], dom["status"]) == (a.guest.name, a.uri, "trimmed")
    # One timeout (15 s), not two, plus the run itself and the CLI's start-up (a few s).
    assert elapsed < 2 * 15, elapsed


def test_host_that_hangs_mid_run_is_dropped_by_keepalive(fleet: Fleet) -> None:
    """Last in the module: it leaves host b's guest with an fstrim that never ends.

    ``--mountpoint /mnt`` runs the guest's ``fstrim`` through guest-exec; on b it is
    replaced by a script that sleeps, so vmtrim keeps polling guest-exec-status
    (``--timeout`` is long), as it would for a guest whose trim takes an hour. Then b's
    libvirtd is stopped under the open connections. libvirt's keepalive closes them
    within about --connect-timeout, so b is reported failed long before --timeout,
    and host a is trimmed as usual.
    """
    a, b = fleet.live[0], fleet.live[1]
    b.guest.agent(
        {
            "execute": "guest-exec",
            "arguments": {
                "path": "/bin/sh",
                "arg": [
                    "-c",
                    "rm /bin/fstrim && printf '#!/bin/sh\\nexec sleep 900\\n' >"
                    " /bin/fstrim && chmod 755 /bin/fstrim",
                ],
            },
        }
    )
    pid = b.host.pid("libvirtd")
    timeout = 120
    args = ["trim", "-c", a.uri, "-c", b.uri, "--all", "--json", "--no-history"]
    args += ["--mountpoint", "/mnt", "--timeout", str(timeout)]
    args += ["--connect-timeout", str(CONNECT_TIMEOUT)]
    process = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", *args], stdout=subprocess.PIPE, text=True
    )
    try:
        # By then vmtrim is polling b's guest (its start-up and connection take a few
        # seconds on this loaded machine; the poll would go on for --timeout).
        time.sleep(CONNECT_TIMEOUT)
        assert process.poll() is None
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = process.communicate(timeout=timeout)
        noticed = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait()
    doc = json.loads(out)
    assert process.returncode == 3, doc
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert hosts[a.uri]["status"] == "ok"
    assert hosts[b.uri]["status"] == "failed"
    assert "connection" in hosts[b.uri]["reason"]
    # Keepalive: KEEPALIVE_COUNT probes CONNECT_TIMEOUT/3 apart, then the CLI's exit.
    assert noticed <= CONNECT_TIMEOUT + 5, noticed
    [dom] = [d for d in doc["domains"] if d["host"] == b.uri]
    assert dom["status"] in ("failed", "skipped") and dom["seconds"] < timeout
