"""`vmtrim audit --qmp SOCKET` against real QEMU processes (paused with -S, TCG, no guest).

The verdicts over QMP must be those of `--pid` (the same process's /proc/PID/cmdline)
and of `--qemu-args` (the same command line as text); QMP adds what only the running
QEMU knows: its exact version, the resolved machine type, hot-plugged disks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import vmtrim
from vmtrim.channels.qmp import SyncMonitor
from vmtrim.errors import BadInput
from vmtrim.sources.qmp import build_domain, expect_greeting, parse_live

pytestmark = pytest.mark.slow
QEMU = "qemu-system-x86_64"


@dataclass
class Qemu:
    pid: int
    qmp: Path
    argv: list[str]


@contextlib.contextmanager
def run_qemu(workdir: Path, name: str, extra: list[str]) -> Iterator[Qemu]:
    """A paused QEMU with a QMP socket; killed by PID whatever happens."""
    sock = workdir / f"{name}.qmp"
    argv = [
        QEMU,
        "-S",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-nodefaults",
        "-name",
        name,
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        *extra,
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"QEMU exited: {proc.stderr.read().decode()}" if proc.stderr else "QEMU exited"
                )
            assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
            time.sleep(0.05)
        yield Qemu(proc.pid, sock, argv)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)  # reap it: PID 1 does not reap orphans here
        if proc.stderr:
            proc.stderr.close()


def qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def audit_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = vmtrim("audit", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def by_target(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {disk["target"]: disk for disk in doc["disks"]}


def verdicts(doc: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        target: (disk["verdict"], {layer["layer"]: layer["verdict"] for layer in disk["layers"]})
        for target, disk in by_target(doc).items()
    }


def layer(disk: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [item for item in disk["layers"] if item["layer"] == name]
    [one] = found
    return one


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short path: a unix socket path must fit in 108 bytes.
    return tmp_path_factory.mktemp("qmp")


@pytest.fixture(scope="module")
def three_disks(workdir: Path) -> Iterator[Qemu]:
    """disk-a passes (virtio-scsi, discard=unmap), disk-b has no discard, disk-c is a
    virtio-blk on a machine type older than 4.0, ide0-hd0 a legacy IDE drive that passes,
    disk-e a virtio-blk with discard=on set on the device, which overrides the machine type."""
    a, b, c, d, e = (qcow2(workdir / f"{n}.qcow2") for n in "abcde")
    extra = [
        "-machine",
        "pc-i440fx-3.1",
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-blockdev",
        json.dumps(
            {"driver": "file", "filename": str(a), "node-name": "a-file", "discard": "unmap"}
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "qcow2",
                "file": "a-file",
                "node-name": "a-fmt",
                "discard": "unmap",
                "detect-zeroes": "unmap",
            }
        ),
        "-device",
        "scsi-hd,drive=a-fmt,id=disk-a,bus=scsi0.0",
        "-drive",
        f"file={b},format=qcow2,if=none,id=drive-b,cache=none",
        "-device",
        "scsi-hd,drive=drive-b,id=disk-b,bus=scsi0.0",
        "-drive",
        f"file={c},format=qcow2,if=none,id=drive-c,discard=unmap",
        "-device",
        "virtio-blk-pci,drive=drive-c,id=disk-c",
        "-drive",
        f"file={d},format=qcow2,if=ide,discard=on",  # legacy: the drive is the disk
        "-drive",
        f"file={e},format=qcow2,if=none,id=drive-e,discard=unmap",
        "-device",
        "virtio-blk-pci,drive=drive-e,id=disk-e,discard=on",
    ]
    with run_qemu(workdir, "three", extra) as qemu:
        yield qemu


def test_verdicts_equal_pid_and_qemu_args(three_disks: Qemu, workdir: Path) -> None:
    args_file = workdir / "three.args"
    args_file.write_text(shlex.join(three_disks.argv) + "\n")
    code_qmp, over_qmp = audit_json("--qmp", str(three_disks.qmp))
    code_pid, over_pid = audit_json("--pid", str(three_disks.pid))
    code_args, over_args = audit_json("--qemu-args", str(args_file))
    assert (code_qmp, code_pid, code_args) == (1, 1, 1)
    assert verdicts(over_qmp) == verdicts(over_pid) == verdicts(over_args)
    disks = by_target(over_qmp)
    assert sorted(disks) == ["disk-a", "disk-b", "disk-c", "disk-e", "ide0-hd0"]
    assert layer(disks["disk-a"], "block_node")["verdict"] == "pass"
    assert layer(disks["disk-a"], "device")["verdict"] == "pass"
    b_nodes = layer(disks["disk-b"], "block_node")
    assert b_nodes["verdict"] == "block" and "-drive drive-b" in b_nodes["reason"]
    c_device = layer(disks["disk-c"], "device")
    assert c_device["verdict"] == "block" and "pc-i440fx-3.1" in c_device["reason"]
    assert layer(disks["disk-c"], "block_node")["verdict"] == "pass"
    assert layer(disks["ide0-hd0"], "block_node")["verdict"] == "pass"
    assert layer(disks["disk-e"], "device")["verdict"] == "pass"


def test_live_facts_from_qmp(three_disks: Qemu, workdir: Path) -> None:
    _, doc = audit_json("--qmp", str(three_disks.qmp))
    [domain] = doc["domains"]
    assert (domain["name"], domain["machine"]) == ("three", "pc-i440fx-3.1")
    banner = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"version (\d+\.\d+\.\d+)", banner)
    assert version is not None
    assert f"QEMU {version.group(1)}," in domain["notes"][0]
    assert f"/proc/{three_disks.pid}/cmdline (pid from SO_PEERCRED)" in " ".join(domain["notes"])
    disks = by_target(doc)
    a = disks["disk-a"]["nodes"]
    assert (a["node_name"], a["driver"], a["discard"], a["detect_zeroes"]) == (
        "a-fmt",
        "qcow2",
        "unmap",
        "unmap",
    )
    assert (a["file"]["node_name"], a["file"]["driver"], a["file"]["filename"]) == (
        "a-file",
        "file",
        str(workdir / "a.qcow2"),
    )
    b = disks["disk-b"]
    assert (b["source"], b["format"], b["discard"], b["nodes"]["cache"]) == (
        str(workdir / "b.qcow2"),
        "qcow2",
        None,
        "none",
    )
    assert disks["disk-c"]["qemu_device"] == "virtio-blk-pci"


def test_hotplugged_disk_and_runtime_snapshot(workdir: Path) -> None:
    base = qcow2(workdir / "base.qcow2")
    image = workdir / "hot.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(image)],
        check=True,
    )
    kept = qcow2(workdir / "kept.qcow2")
    snapshot = workdir / "snap.qcow2"
    extra = [
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-drive",
        f"file={kept},format=qcow2,if=none,id=drive-k,discard=unmap",
        "-device",
        "scsi-hd,drive=drive-k,id=disk-k,bus=scsi0.0",
    ]
    with run_qemu(workdir, "hot", extra) as qemu:
        with SyncMonitor(str(qemu.qmp), timeout=20) as monitor:
            monitor.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "hot-fmt",
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": str(image), "node-name": "hot-file"},
                },
            )
            monitor.execute(
                "device_add",
                {"driver": "scsi-hd", "drive": "hot-fmt", "id": "hot0", "bus": "scsi0.0"},
            )
        _, before = audit_json("--qmp", str(qemu.qmp))  # QMP takes one client at a time
        with SyncMonitor(str(qemu.qmp), timeout=20) as monitor:
            monitor.execute(
                "blockdev-snapshot-sync",
                {"device": "drive-k", "snapshot-file": str(snapshot), "format": "qcow2"},
            )
        _, on_cmdline = audit_json("--pid", str(qemu.pid))
        code, after = audit_json("--qmp", str(qemu.qmp))
    assert [d["target"] for d in on_cmdline["disks"]] == ["disk-k"]
    assert code == 0
    disks = by_target(before)
    assert sorted(disks) == ["disk-k", "hot0"]
    hot = disks["hot0"]
    assert (hot["source"], hot["bus"], hot["controller_model"]) == (
        str(image),
        "scsi",
        "virtio-scsi",
    )
    assert hot["discard"] == "unknown"
    nodes = layer(hot, "block_node")
    assert nodes["verdict"] == "unknown"
    assert "QMP does not show discard" in nodes["reason"] and "hot-plugged" in nodes["reason"]
    assert layer(hot, "device")["verdict"] == "pass"
    # The backing chain QEMU opened, from the live node graph.
    assert (
        hot["nodes"]["backing"]["driver"],
        hot["nodes"]["backing"]["filename"],
        hot["nodes"]["backing"]["read_only"],
    ) == ("qcow2", str(base), True)
    assert any(str(base) in f["message"] for f in hot["findings"])  # overlay: base never shrinks
    # A snapshot taken at runtime puts a new node on top: the command line no longer
    # describes the node the device uses, so its discard is unknown; --pid cannot see it.
    assert layer(disks["disk-k"], "block_node")["verdict"] == "pass"
    kept_now = by_target(after)["disk-k"]
    assert (kept_now["source"], kept_now["discard"]) == (str(snapshot), "unknown")
    assert "created at runtime" in layer(kept_now, "block_node")["reason"]
    below = kept_now["nodes"]["backing"]  # the configured node, now under the snapshot
    assert (below["filename"], below["discard"], below["discard_unknown"]) == (
        str(kept),
        "unmap",
        None,
    )
    assert layer(by_target(on_cmdline)["disk-k"], "block_node")["verdict"] == "pass"


@contextlib.contextmanager
def forwarder(listen: Path, target: Path) -> Iterator[None]:
    """Forward a unix socket the way socat would: its peer is this (python) process."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(listen))
    server.listen(1)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = server.accept()
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(target))
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
            pump(client, upstream)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.close()
        thread.join(timeout=10)


def test_forwarded_socket_falls_back_to_qmp_only(three_disks: Qemu, workdir: Path) -> None:
    relay = workdir / "relay.sock"
    with forwarder(relay, three_disks.qmp):
        code, doc = audit_json("--qmp", str(relay))
    [domain] = doc["domains"]
    assert f"the socket's peer is pid {os.getpid()}" in " ".join(domain["notes"])
    assert "QMP-only" in " ".join(domain["notes"])
    disks = by_target(doc)
    assert {t: d["discard"] for t, d in disks.items()} == {
        "disk-a": "unmap",  # detect_zeroes=unmap proves it on the top node
        "disk-b": "unknown",
        "disk-c": "unknown",
        "disk-e": "unknown",
        "ide0-hd0": "unknown",
    }
    assert {layer(d, "block_node")["verdict"] for d in disks.values()} == {"unknown"}
    # The device layer needs no command line: QOM's live virtio-blk `discard` property
    # (false on disk-c by the machine type, true on disk-e by discard=on) decides it.
    assert code == 1
    assert "pc-i440fx-3.1" in layer(disks["disk-c"], "device")["reason"]
    assert layer(disks["disk-c"], "device")["verdict"] == "block"
    assert layer(disks["disk-e"], "device")["verdict"] == "pass"


@pytest.fixture
def speaker(workdir: Path) -> Iterator[Path]:
    """A unix socket that greets with something that is not QMP."""
    path = workdir / "speaker.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = server.accept()
            client.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            client.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.close()
        path.unlink()


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


def test_bad_sockets(workdir: Path, speaker: Path) -> None:
    missing = vmtrim("audit", "--qmp", "/nonexistent/qmp.sock")
    assert missing.returncode == 2
    assert one_line(missing) == "vmtrim: /nonexistent/qmp.sock: no such socket (given with --qmp)\n"
    image = qcow2(workdir / "plain.qcow2")
    plain = vmtrim("audit", "--qmp", str(image))
    assert plain.returncode == 2 and one_line(plain).startswith(f"vmtrim: {image}: not a socket")
    other = vmtrim("audit", "--qmp", str(speaker))
    assert other.returncode == 2
    assert one_line(other) == (
        f"vmtrim: {speaker}: not a QMP socket (it said 'SSH-2.0-OpenSSH_9.2')\n"
    )
    stale = workdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(stale))  # bound, never listening: what a dead QEMU leaves behind
    refused = vmtrim("audit", "--qmp", str(stale))
    assert refused.returncode == 3 and "connection refused" in one_line(refused)


def test_silent_and_agent_sockets(workdir: Path) -> None:
    silent = workdir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(silent))
        server.listen(1)  # never accepts: like a monitor another client holds
        started = time.monotonic()
        result = vmtrim("audit", "--qmp", str(silent), "--timeout", "1")
        assert time.monotonic() - started < 15
    assert result.returncode == 3 and "no QMP greeting within 1 s" in one_line(result)
    agent_sock = workdir / "qga.sock"
    agent = subprocess.Popen(
        [
            "qemu-ga",
            "-m",
            "unix-listen",
            "-p",
            str(agent_sock),
            "-t",
            str(workdir),
            "-f",
            str(workdir / "qga.pid"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not agent_sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "qemu-ga did not start"
            time.sleep(0.05)
        wrong = vmtrim("audit", "--qmp", str(agent_sock), "--timeout", "1")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
    assert wrong.returncode == 2
    assert one_line(wrong) == (
        f"vmtrim: {agent_sock}: a guest agent socket, not QMP (give it to `vmtrim trim --qga`)\n"
    )


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "qdev",
                    "device",
                    "inserted",
                    "node-name",
                    "drv",
                    "file",
                    "name",
                    "nodes",
                    "edges",
                    "id",
                    "type",
                    "parent",
                    "child",
                    "qemu",
                    "major",
                    "ro",
                    "cache",
                    "detect_zeroes",
                    "discard",
                    "hotplugged",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            key: _json for key in ("version", "machine", "name", "block", "nodes", "graph", "qom")
        },
    )
)
def test_parse_live_takes_any_answer(raw: dict[str, Any]) -> None:
    """QMP answers from another QEMU version may lack or reshape anything: never a crash."""
    live = parse_live(raw)
    domain = build_domain(live, None, "fuzz.sock", "fuzzing")
    assert domain.name and all(disk.ident for disk in domain.disks)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_any_greeting_is_qmp_or_bad_input(data: bytes) -> None:
    """Whatever a socket says first, the check accepts a QMP greeting or names the socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        theirs.sendall(data)
        try:
            expect_greeting(ours, "peer.sock", 1.0)
        except BadInput as exc:
            assert exc.subject == "peer.sock" and "not a QMP socket" in exc.message
        else:
            assert data.lstrip()[:1] == b"{"  # a greeting is a JSON object
        assert ours.recv(4096, socket.MSG_PEEK) == data  # only peeked: qemu.qmp reads it next


# --- a hostile QMP monitor (a fake socket: it only plays back answers) -----------------

GREETING = json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n"


def monitor(answers: dict[str, Any], delay: float = 0.0) -> Any:
    """A QMP monitor that answers each command from ``answers`` (missing: CommandNotFound)."""
    from test_channels_replies import reply

    def handle(message: dict[str, Any]) -> bytes:
        command = str(message.get("execute"))
        if command != "qmp_capabilities":
            time.sleep(delay)
        if command == "qmp_capabilities":
            return reply(message, b"{}")
        if command in answers:
            return reply(message, json.dumps(answers[command]).encode())
        error = {"error": {"class": "CommandNotFound", "desc": command}, "id": message.get("id")}
        return json.dumps(error).encode() + b"\n"

    return handle


def looped_graph(depth: int) -> dict[str, Any]:
    """Nodes n0..n(depth-1), each n(i) with n(i+1) as both file and backing, the last back
    to n0: followed naively that is 2**depth nodes."""
    names = [f"n{i}" for i in range(depth)]
    return {
        "query-version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
        "query-block": [
            {"device": "", "qdev": "/machine/peripheral-anon/device[0]",
             "inserted": {"node-name": "n0", "drv": "qcow2", "file": "/x.qcow2", "ro": False}}
        ],
        "query-named-block-nodes": [
            {"node-name": n, "drv": "qcow2", "file": f"/{n}.qcow2", "ro": False} for n in names
        ],
        "x-debug-query-block-graph": {
            "nodes": [{"id": i, "name": n, "type": "block-driver"} for i, n in enumerate(names)],
            "edges": [
                {"parent": i, "child": (i + 1) % depth, "name": role}
                for i in range(depth)
                for role in ("file", "backing")
            ],
        },
    }  # fmt: skip


def test_hostile_block_graph_is_visited_once() -> None:
    from test_channels_replies import fake

    with fake(monitor(looped_graph(64)), greeting=GREETING) as server:
        start = time.monotonic()
        result = vmtrim("audit", "--qmp", str(server.path), "--json", "--timeout", "10", timeout=60)
        elapsed = time.monotonic() - start
    assert result.returncode in (0, 1), result.stderr  # an audit, not a crash or exit 3/4
    doc = json.loads(result.stdout)
    assert doc["schema"].startswith("vmtrim.audit/")
    assert elapsed < 10 + 10  # start-up aside; 2**64 nodes would never end


def test_slow_qmp_is_bounded_by_timeout_for_the_whole_call() -> None:
    """200 devices, each answer 0.1 s late: every call is in time, the whole audit is not."""
    from test_channels_replies import fake

    answers = looped_graph(2)
    answers["query-block"] = [
        {"device": f"d{i}", "qdev": f"dev{i}", "inserted": {"node-name": "n0", "drv": "raw"}}
        for i in range(200)
    ]
    with fake(monitor(answers, delay=0.1), greeting=GREETING) as server:
        start = time.monotonic()
        result = vmtrim("audit", "--qmp", str(server.path), "--timeout", "2", timeout=120)
        elapsed = time.monotonic() - start
    assert result.returncode == 3
    assert one_line(result) == (
        f"vmtrim: {server.path}: QMP did not answer every query within 2 s\n"
    )
    assert elapsed < 2 + 8  # python start-up is the rest; per call it was 200 x 5 x 0.1 s


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.tuples(
                    st.integers(0, n - 1),
                    st.integers(0, n - 1),
                    st.sampled_from(["file", "backing"]),
                ),
                max_size=4 * n,
            ),
        )
    )
)
def test_any_block_graph_gives_a_tree_no_bigger_than_its_edges(
    graph: tuple[int, list[tuple[int, int, str]]],
) -> None:
    """Loops, shared children, self-edges: each node is expanded once, so the tree the
    audit walks has at most one node per edge (plus the top)."""
    n, edges = graph
    raw = looped_graph(n)
    raw["x-debug-query-block-graph"]["edges"] = [
        {"parent": p, "child": c, "name": role} for p, c, role in edges
    ]
    live = parse_live(
        {
            "version": raw["query-version"],
            "block": raw["query-block"],
            "nodes": raw["query-named-block-nodes"],
            "graph": raw["x-debug-query-block-graph"],
        }
    )
    [device] = live.devices

    def size(node: Any) -> int:
        return 0 if node is None else 1 + size(node.file) + size(node.backing)

    assert size(device.top) <= len(edges) + 1
