"""Hostile text inputs (--xml, --qemu-args): one line and exit 2, bounded memory, no hang.

Each case runs the real CLI under a 1 GiB address-space cap (files_support.MEMORY_CAP):
a read that is not bounded dies there of MemoryError (exit 4) instead of passing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from files_support import one_line, vmtrim
from vmtrim._util.files import MAX_INPUT_BYTES, read_input
from vmtrim.errors import BadInput

DATA = Path(__file__).parent / "data" / "audit"

# Every command and option that reads a text input.
READERS = [
    ("audit", "--no-probe", "--xml"),
    ("audit", "--no-probe", "--qemu-args"),
    ("fix", "--no-probe", "--xml"),
    ("fix", "--no-probe", "--qemu-args"),
]


def _fifo(tmp: Path) -> Path:
    path = tmp / "pipe"
    os.mkfifo(path)  # nobody ever writes: opening it for reading would block forever
    return path


def _directory(tmp: Path) -> Path:
    return tmp


def _big_sparse(tmp: Path) -> Path:
    path = tmp / "huge.xml"
    with path.open("wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: costs nothing to make, 64 MiB to read
    return path


def _socket(tmp: Path) -> Iterator[Path]:
    path = tmp / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    try:
        yield path
    finally:
        server.close()


@pytest.fixture(
    params=["/dev/zero", "/dev/full", "fifo", "directory", "/proc/self/mem", "huge", "socket"]
)
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    makers: dict[str, Callable[[Path], Path]] = {
        "fifo": _fifo,
        "directory": _directory,
        "huge": _big_sparse,
    }
    name: str = request.param
    if name == "socket":
        yield from _socket(tmp_path)
    elif name in makers:
        yield makers[name](tmp_path)
    else:
        yield Path(name)


@pytest.mark.parametrize("reader", READERS, ids=lambda r: f"{r[0]}{r[2]}")
def test_hostile_input_is_one_line_exit_2(reader: tuple[str, ...], hostile: Path) -> None:
    result = vmtrim(*reader, str(hostile))
    assert result.returncode == 2, result.stderr
    one_line(result, hostile)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/dev/zero", "character device"), ("/dev/loop-control", "character device")],
)
def test_the_message_says_what_the_file_is(path: str, kind: str) -> None:
    message = one_line(vmtrim("audit", "--xml", path), path)
    assert kind in message and "regular file" in message


def test_fifo_says_fifo_and_is_left_alone(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path)
    message = one_line(vmtrim("fix", "--xml", str(fifo)), fifo)
    assert "FIFO" in message and "'-'" in message  # it points to stdin for pipes
    assert sorted(tmp_path.iterdir()) == [fifo]


def test_too_big_says_so_and_names_the_limit(tmp_path: Path) -> None:
    huge = _big_sparse(tmp_path)
    message = one_line(vmtrim("audit", "--xml", str(huge)), huge)
    assert message.startswith(f"larger than {MAX_INPUT_BYTES >> 20} MiB")


@pytest.mark.parametrize("reader", READERS, ids=lambda r: f"{r[0]}{r[2]}")
def test_endless_stdin_is_capped(reader: tuple[str, ...]) -> None:
    with open("/dev/zero", "rb") as zero:
        result = vmtrim(*reader, "-", stdin=zero)
    assert result.returncode == 2, result.stderr
    assert one_line(result, "<stdin>").startswith("larger than")


def test_good_input_still_reads_from_a_file_a_link_and_stdin(tmp_path: Path) -> None:
    link = tmp_path / "link.xml"
    link.symlink_to(DATA / "design-scsi.xml")  # reading through a link changes nothing
    direct = vmtrim("audit", "--no-probe", "--json", "--xml", str(DATA / "design-scsi.xml"))
    via_link = vmtrim("audit", "--no-probe", "--json", "--xml", str(link))
    with (DATA / "design-scsi.xml").open("rb") as f:
        via_stdin = vmtrim("audit", "--no-probe", "--json", "--xml", "-", stdin=f)
    assert direct.returncode in (0, 1), direct.stderr
    assert via_link.returncode == via_stdin.returncode == direct.returncode
    assert via_link.stdout.count('"target"') == direct.stdout.count('"target"') > 0


def test_the_cap_is_inclusive(tmp_path: Path) -> None:
    at, over = tmp_path / "at", tmp_path / "over"
    at.write_bytes(b"x" * 4096)
    over.write_bytes(b"x" * 4097)
    assert read_input(str(at), limit=4096) == b"x" * 4096
    with pytest.raises(BadInput) as caught:
        read_input(str(over), limit=4096)
    assert caught.value.subject == str(over)


def test_missing_file_and_missing_parent(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.xml", tmp_path / "absent" / "dom.xml"):
        result = vmtrim("audit", "--xml", str(path))
        assert result.returncode == 2
        assert one_line(result, path) == "no such file"
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    result = vmtrim("audit", "--xml", str(not_dir / "dom.xml"))
    assert result.returncode == 2
    one_line(result, not_dir / "dom.xml")
