"""Hostile guest-agent and QMP replies: refused with a reason, memory and time bounded.

The guest (and whoever runs a QEMU) writes these replies, so they are attacker
input. A fake server on a unix socket (plumbing: it only plays back bytes) sends what
a hostile qemu-ga or QMP monitor could: a reply line that never ends, an integer of
5,000 digits (Python's int-str limit raises ValueError), JSON nested 100,000 deep
(RecursionError), byte counts outside their QAPI range. Each must become
AgentCommandFailed (exit 1 for trim: the domain *failed*), never an internal error.
The real lab guest beside such an agent is in test_trim_hostile.py.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import vmtrim
from vmtrim.channels.qmp import (
    MAX_REPLY_BYTES,
    ReplyRejected,
    SyncGuestAgent,
    loads_reply,
    parse_blockstats,
    parse_exec_status,
    parse_fsinfo,
    parse_fstrim,
    parse_query_block,
)
from vmtrim.errors import AgentCommandFailed, AgentUnavailable

MiB = 1024 * 1024
#: What a reply handler may answer: bytes to send, or None to stay silent (hung).
Handler = Callable[[dict[str, Any]], bytes | None]


class FakeServer:
    """A unix-socket server that answers each JSON line with ``handler``'s bytes.

    ``flood`` commands get an endless line instead: it counts what the peer took
    before hanging up, which bounds what the client buffered.
    """

    def __init__(self, path: Path, handler: Handler, *, greeting: bytes | None = None) -> None:
        self.path = path
        self.handler = handler
        self.greeting = greeting
        self.flooded = 0
        self.commands: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            if self.greeting is not None:
                conn.sendall(self.greeting)
            buf = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf or buf.rstrip().endswith(b"}"):
                    line, _, buf = buf.partition(b"\n")
                    try:
                        message = json.loads(line)
                    except ValueError:
                        break
                    self.commands.append(str(message.get("execute")))
                    reply = self.handler(message)
                    if reply == b"FLOOD":
                        self._flood(conn)
                        return
                    if reply is not None:
                        try:
                            conn.sendall(reply)
                        except OSError:
                            return

    def _flood(self, conn: socket.socket) -> None:
        block = b"9" * MiB
        try:
            while self.flooded < 2048 * MiB and not self._stop.is_set():
                conn.sendall(block)
                self.flooded += len(block)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)


@contextmanager
def fake(handler: Handler, *, greeting: bytes | None = None) -> Iterator[FakeServer]:
    workdir = Path(tempfile.mkdtemp(prefix="vmtrim-fake-"))
    server = FakeServer(workdir / "fake.sock", handler, greeting=greeting)
    try:
        yield server
    finally:
        server.close()
        (workdir / "fake.sock").unlink(missing_ok=True)
        os.rmdir(workdir)


def reply(message: dict[str, Any], body: bytes) -> bytes:
    """``{"return": BODY, "id": ...}`` with BODY as raw bytes (it may not be valid JSON)."""
    ident = json.dumps(message.get("id")).encode()
    return b'{"return": ' + body + b', "id": ' + ident + b"}\n"


def agent(fstrim: Callable[[dict[str, Any]], bytes | None]) -> Handler:
    """A qemu-ga that syncs like the real one and answers guest-fstrim with ``fstrim``."""

    def handle(message: dict[str, Any]) -> bytes | None:
        command = message.get("execute")
        if command == "guest-sync":
            return reply(message, json.dumps(message["arguments"]["id"]).encode())
        if command == "guest-fstrim":
            return fstrim(message)
        return b'{"error": {"class": "CommandNotFound", "desc": "no"}, "id": %s}\n' % (
            json.dumps(message.get("id")).encode()
        )

    return handle


def paths(trimmed: bytes) -> Callable[[dict[str, Any]], bytes]:
    return lambda m: reply(m, b'{"paths": [{"path": "/mnt", "trimmed": ' + trimmed + b"}]}")


HOSTILE: dict[str, Callable[[dict[str, Any]], bytes | None]] = {
    "endless line": lambda m: b"FLOOD",
    "5000-digit integer": paths(b"9" * 5000),
    "nested 100000 deep": lambda m: reply(m, b"[" * 100_000 + b"]" * 100_000),
    "negative trimmed": paths(b"-9223372036854775808"),
    "trimmed over int64": paths(str(2**64).encode()),
    "trimmed is a string": paths(b'"lots"'),
    "not an object": lambda m: b"[1, 2, 3]\n",
}
#: What the one-line reason must say for each, so a user knows what the guest sent.
SAYS = {
    "endless line": f"over {MAX_REPLY_BYTES} bytes",
    "5000-digit integer": "integer of 5000 digits",
    "nested 100000 deep": "nested too deeply",
    "negative trimmed": "outside 0..",
    "trimmed over int64": "outside 0..",
    "trimmed is a string": "'lots'",
    "not an object": "not a JSON object",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_fstrim_reply_is_a_command_failure(kind: str) -> None:
    with fake(agent(HOSTILE[kind])) as server:
        with (
            SyncGuestAgent(str(server.path), timeout=10) as ga,
            pytest.raises(AgentCommandFailed) as info,
        ):
            ga.fstrim()
        assert info.value.command == "guest-fstrim"
        assert SAYS[kind] in info.value.message
        assert info.value.subject == str(server.path)
        # The cap is what the client buffers: it hung up long before 2 GiB went by.
        assert server.flooded < 64 * MiB


@pytest.mark.parametrize("kind", ["endless line", "5000-digit integer", "nested 100000 deep"])
def test_cli_reports_the_domain_failed_with_one_line(kind: str) -> None:
    with fake(agent(HOSTILE[kind])) as server:
        result = vmtrim("trim", "--qga", str(server.path), "--json", timeout=120)
    assert result.returncode == 1, result.stderr  # a failed domain, not exit 3/4
    assert "Traceback" not in result.stderr
    [dom] = json.loads(result.stdout)["domains"]
    assert dom["status"] == "failed"
    assert "guest-fstrim" in dom["reason"] and SAYS[kind] in dom["reason"]


def test_guest_paths_reach_the_terminal_escaped() -> None:
    """A guest that names its filesystem with escape sequences and markup."""
    evil = "/mnt\x1b[2J\x1b[H[b]forged[/b] [/x]"
    body = json.dumps({"paths": [{"path": evil, "error": "denied\r\x1b[31mOK"}]}).encode()
    with fake(agent(lambda m: reply(m, body))) as server:
        result = vmtrim("trim", "--qga", str(server.path), timeout=120)
    assert result.returncode == 1  # the only path failed
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "\\x1b[2J\\x1b[H[b]forged[/b] [/x]" in result.stdout  # as typed, escaped
    assert "denied\\x0d\\x1b[31mOK" in result.stdout
    assert "Traceback" not in result.stderr


def test_silent_qmp_does_not_outlast_timeout() -> None:
    """--timeout bounds the whole run: QMP calls had a fixed 10 s each (36.6 s for 2)."""
    greeting = json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n"

    def monitor(message: dict[str, Any]) -> bytes | None:
        if message.get("execute") == "qmp_capabilities":
            return reply(message, b"{}")
        return None  # every query hangs

    ok = agent(lambda m: reply(m, b'{"paths": []}'))
    with fake(ok) as qga, fake(monitor, greeting=greeting) as qmp:
        start = time.monotonic()
        result = vmtrim(
            "trim", "--qga", str(qga.path), "--qmp", str(qmp.path), "--timeout", "2", "--json"
        )
        elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    [dom] = json.loads(result.stdout)["domains"]
    assert dom["status"] == "skipped"
    assert dom["seconds"] <= 2 + 0.5
    # Python start-up is the rest; one fixed 10 s QMP limit would already exceed it.
    assert elapsed < 2 + 7


# --- the parsers, fuzzed: any reply is a value or AgentCommandFailed, nothing else -----

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = ["paths", "path", "trimmed", "minimum", "error", "exited", "exitcode", "signal",
        "out-data", "err-data", "used-bytes", "total-bytes", "disk", "stats", "unmap_bytes",
        "inserted", "qdev", "device", "node-name", "ro", "image", "filename"]  # fmt: skip
shaped = st.recursive(
    json_values,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(shaped)
def test_reply_parsers_never_crash(value: Any) -> None:
    for parse in (parse_fstrim, parse_fsinfo, parse_exec_status, parse_blockstats):
        try:
            parse(value)
        except AgentCommandFailed as exc:
            assert exc.command and exc.message
    parse_query_block(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | shaped.map(lambda v: json.dumps(v).encode()))
def test_loads_reply_is_json_or_rejected(data: bytes) -> None:
    try:
        loads_reply(data)
    except ReplyRejected as exc:
        assert str(exc)


def test_numbers_outside_their_qapi_range_name_the_field() -> None:
    with pytest.raises(AgentCommandFailed, match="used-bytes for 'sda1'"):
        parse_fsinfo([{"name": "sda1", "used-bytes": -1}])
    with pytest.raises(AgentCommandFailed, match="exitcode"):
        parse_exec_status({"exited": True, "exitcode": 2**40})
    with pytest.raises(AgentCommandFailed, match="unmap_bytes"):
        parse_blockstats([{"device": "d", "stats": {"unmap_bytes": -5}}])
    [fs] = parse_fsinfo([{"name": "sda1", "used-bytes": 2**64 - 1, "total-bytes": 0}])
    assert fs.used_bytes == 2**64 - 1  # uint64: the top of the range is a real value


def test_an_agent_that_never_answers_is_unavailable_in_time() -> None:
    with fake(lambda m: None) as server:
        start = time.monotonic()
        with pytest.raises(AgentUnavailable), SyncGuestAgent(str(server.path), timeout=2):
            pass
        assert time.monotonic() - start < 2 + 2


def exec_agent(out: bytes, exitcode: int) -> Handler:
    """A qemu-ga whose guest-exec'd program runs for two polls, then prints ``out``."""
    polls: list[int] = []

    def fstrim(message: dict[str, Any]) -> bytes | None:
        return None

    base = agent(fstrim)

    def handle(message: dict[str, Any]) -> bytes | None:
        command = message.get("execute")
        if command == "guest-exec":
            return reply(message, b'{"pid": 4242}')
        if command == "guest-exec-status":
            polls.append(1)
            if len(polls) < 3:
                return reply(message, b'{"exited": false}')
            status = {
                "exited": True,
                "exitcode": exitcode,
                "out-data": base64.b64encode(out).decode(),
            }
            return reply(message, json.dumps(status).encode())
        return base(message)

    return handle


@pytest.mark.parametrize(
    ("out", "exitcode", "status", "says"),
    [
        (b"/mnt: 123 MiB (128974848 bytes) trimmed\n", 0, "trimmed", None),
        (b"/mnt: " + b"9" * 5000 + b" bytes trimmed\n", 0, "failed", "out of range"),
        (b"/mnt: 99999999999999999999 bytes trimmed\n", 0, "failed", "out of range"),
        (b"", 2**40, "failed", "exitcode"),
    ],
)
def test_mountpoint_output_and_exit_code_are_range_checked(
    out: bytes, exitcode: int, status: str, says: str | None
) -> None:
    with fake(exec_agent(out, exitcode)) as server:
        result = vmtrim("trim", "--qga", str(server.path), "--mountpoint", "/mnt", "--json")
    [dom] = json.loads(result.stdout)["domains"]
    assert (dom["status"], result.returncode) == (status, 0 if status == "trimmed" else 1)
    if says is None:
        assert dom["paths"][0]["trimmed"] == 128974848  # what the guest printed, parsed
    else:
        assert says in dom["reason"]
    assert server.commands.count("guest-exec-status") >= 3  # polled until it exited
