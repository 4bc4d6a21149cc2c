"""The fleet's host list and per-host isolation, without guests: libvirt's test driver
(``test:///default``, a real libvirt connection with one running domain), a port where
nothing listens, and a socket that accepts connections and never answers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_hosts import free_port
from helpers import vmtrim
from vmtrim.errors import BadInput
from vmtrim.fleet.hosts import host_list, is_remote, read_hosts_file

TEST_URI = "test:///default"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port whose kernel accepts the connection (the backlog) and nothing answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield int(server.getsockname()[1])


def test_hosts_file_comments_blanks_and_order(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "# rack 1\n\nqemu+ssh://root@kvm1/system   # the old one\n"
        "  qemu+tcp://kvm2/system\n#qemu+ssh://retired/system\nqemu+ssh://root@kvm1/system\n"
    )
    assert read_hosts_file(str(hosts)) == [
        "qemu+ssh://root@kvm1/system",
        "qemu+tcp://kvm2/system",
        "qemu+ssh://root@kvm1/system",
    ]
    # -c first, then the file's; each host once.
    assert host_list(["qemu:///system", "qemu+tcp://kvm2/system"], str(hosts)) == [
        "qemu:///system",
        "qemu+tcp://kvm2/system",
        "qemu+ssh://root@kvm1/system",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [("# nothing\n\n", "names no URI"), ("qemu:///system extra\n", "line 1: one URI per line")],
)
def test_bad_hosts_file_is_bad_input(tmp_path: Path, text: str, message: str) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    with pytest.raises(BadInput, match=message):
        read_hosts_file(str(hosts))
    result = vmtrim("trim", "--hosts", str(hosts), "--all")
    assert result.returncode == 2 and message in result.stderr


def test_missing_hosts_file_exits_2(tmp_path: Path) -> None:
    result = vmtrim("audit", "--hosts", str(tmp_path / "nope"), "--all")
    assert result.returncode == 2
    assert f"{tmp_path / 'nope'}: cannot read the host list" in result.stderr


def test_remote_means_a_transport_or_a_host_name() -> None:
    assert not is_remote("qemu:///system")
    assert not is_remote("qemu:///system?socket=/run/x/libvirt-sock")
    assert is_remote("qemu+tcp://127.0.0.1:16509/system")
    assert is_remote("qemu+ssh://root@kvm1/system")
    assert is_remote("qemu://kvm1/system")


def test_a_silent_host_fails_within_connect_timeout_the_others_answer(silent_port: int) -> None:
    silent = f"qemu+tcp://127.0.0.1:{silent_port}/system"
    refused = f"qemu+tcp://127.0.0.1:{free_port()}/system"
    timeout = 2.0
    start = time.monotonic()
    result = vmtrim(
        "audit", "-c", silent, "-c", TEST_URI, "-c", refused, "--all", "--json",
        "--connect-timeout", str(timeout), "--no-probe",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert [h["host"] for h in doc["hosts"]] == [silent, TEST_URI, refused]
    assert hosts[silent]["status"] == "failed"
    assert hosts[silent]["reason"] == f"no answer within --connect-timeout {timeout:g} s"
    assert timeout <= hosts[silent]["seconds"] <= timeout + 1
    assert "Connection refused" in hosts[refused]["reason"]
    assert hosts[TEST_URI]["status"] == "ok"
    assert [(d["host"], d["domain"]) for d in doc["disks"]] == [(TEST_URI, "test")]
    assert doc["fleet"] == {
        "hosts": 3,
        "failed_hosts": 2,
        "domains": 1,
        "disks": 1,
        "blocking_disks": hosts[TEST_URI]["blocking_disks"],
    }
    # The hosts are worked on at once: one timeout, plus the CLI's start-up.
    assert elapsed < timeout + 10


def test_named_domain_is_looked_for_on_every_host() -> None:
    # "test" is on the test driver's host only; a name on no host is a finding (exit 1).
    doc = json.loads(
        vmtrim("trim", "-c", TEST_URI, "-c", "test:///default?x=1", "test", "--json",
               "--no-history", "--timeout", "2").stdout
    )  # fmt: skip
    assert [d["host"] for d in doc["domains"]] == [TEST_URI, "test:///default?x=1"]
    result = vmtrim(
        "trim", "-c", TEST_URI, "-c", "test:///default?x=1", "nosuch", "--json", "--no-history"
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["not_found"] == ["nosuch"]


def test_fix_dry_run_on_every_host_that_has_the_domain() -> None:
    refused = f"qemu+tcp://127.0.0.1:{free_port()}/system"
    result = vmtrim("fix", "-c", TEST_URI, "-c", refused, "test", "--dry-run", "--json")
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    [dom] = doc["domains"]
    assert (dom["host"], dom["domain"], dom["mode"], dom["defined"]) == (
        TEST_URI,
        "test",
        "dry-run",
        False,
    )
    assert "+      <driver name='qemu' type='raw' discard='unmap'/>" in dom["diff"]
    assert [(h["host"], h["status"]) for h in doc["hosts"]] == [
        (TEST_URI, "ok"),
        (refused, "failed"),
    ]
    human = vmtrim("fix", "-c", TEST_URI, "-c", refused, "test", "--dry-run")
    assert human.returncode == 3
    assert "discard='unmap'" in human.stdout
    assert human.stdout.splitlines()[-1] == "fleet: 2 host(s), 1 failed; 1 domain(s), 0 defined"


def test_run_takes_the_hosts_from_c_and_hosts_instead_of_the_policy(tmp_path: Path) -> None:
    refused = f"qemu+tcp://127.0.0.1:{free_port()}/system"
    policy = tmp_path / "policy.toml"
    policy.write_text('connect = ["qemu+tcp://127.0.0.1:1/never-used"]\n')
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{refused}  # down\n")
    result = vmtrim(
        "run", "--policy", str(policy), "-c", TEST_URI, "--hosts", str(hosts), "--dry-run",
        "--json", "--connect-timeout", "2",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    assert doc["policy"]["connect"] == [TEST_URI, refused]
    [failed] = doc["failed_hosts"]
    assert failed["host"] == refused and "Connection refused" in failed["reason"]
    assert [(d["uri"], d["domain"]) for d in doc["domains"]] == [(TEST_URI, "test")]


def test_fleet_trim_records_each_reachable_host_in_the_history(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    refused = f"qemu+tcp://127.0.0.1:{free_port()}/system"
    trim = vmtrim("trim", "-c", TEST_URI, "-c", refused, "--all", "--db", str(db), "--timeout", "2")
    assert trim.returncode == 3, trim.stderr
    history = json.loads(vmtrim("history", "--db", str(db), "--json").stdout)
    [entry] = history["domains"]
    assert (entry["domain"], entry["runs"], entry["last_kind"]) == ("test", 1, "trim")
