"""Fuzz read_input, atomic_write and update_file over random file types, sizes and link shapes.

Each example builds a real directory: regular files of random size and mode, hard
links, directories, FIFOs, sockets, a device, and symbolic links to any of them (or to
nothing, or to themselves). The properties are what a user relies on: a regular file
within the cap reads back exactly, anything else is BadInput naming the path (never
another exception, never a hang); a write either lands whole with the old mode kept or
is refused with nothing on disk changed.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vmtrim._util.files import atomic_write, read_input, update_file
from vmtrim.errors import BadInput

KINDS = ["regular", "directory", "fifo", "socket", "device", "dangling", "loop", "missing"]


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    size: int = 0
    mode: int = 0o644
    links: int = 1  # hard links, for a regular file
    via_symlink: bool = False  # the path given is a symbolic link to the thing


shapes = st.builds(
    Shape,
    kind=st.sampled_from(KINDS),
    size=st.integers(0, 96),
    mode=st.sampled_from([0o644, 0o600, 0o640, 0o444, 0o400, 0o604, 0o2755]),
    links=st.integers(1, 3),
    via_symlink=st.booleans(),
)


@contextmanager
def built(shape: Shape) -> Iterator[tuple[Path, Path]]:
    """(directory, the path to give) with ``shape`` made real inside the directory."""
    with tempfile.TemporaryDirectory(prefix="vmtrim-fuzz-") as top:
        root = Path(top)
        thing = root / "thing"
        server = None
        if shape.kind == "regular":
            thing.write_bytes(bytes(range(256))[: shape.size])
            os.chmod(thing, shape.mode)
            for n in range(1, shape.links):
                os.link(thing, root / f"other-{n}")
        elif shape.kind == "directory":
            thing.mkdir()
        elif shape.kind == "fifo":
            os.mkfifo(thing)
        elif shape.kind == "socket":
            server = socket.socket(socket.AF_UNIX)
            server.bind(str(thing))
        elif shape.kind == "device":
            thing.symlink_to("/dev/zero")  # a link to a device is still a device to read
        elif shape.kind == "dangling":
            thing.symlink_to(root / "nowhere")
        elif shape.kind == "loop":
            thing.symlink_to(thing)
        given_path = thing
        if shape.via_symlink:
            given_path = root / "link"
            given_path.symlink_to(thing)
        try:
            yield root, given_path
        finally:
            if server is not None:
                server.close()


def state(root: Path) -> dict[str, tuple[int, int, bytes | str]]:
    seen: dict[str, tuple[int, int, bytes | str]] = {}
    for entry in sorted(root.rglob("*")):
        info = entry.lstat()
        body: bytes | str = b""
        if stat.S_ISLNK(info.st_mode):
            body = os.readlink(entry)
        elif stat.S_ISREG(info.st_mode):
            body = entry.read_bytes()
        seen[entry.name] = (info.st_mode, info.st_ino, body)
    return seen


def resolves_to_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@settings(max_examples=300, deadline=None)
@given(shape=shapes, limit=st.integers(0, 64))
def test_read_input_reads_regular_files_within_the_cap_and_refuses_the_rest(
    shape: Shape, limit: int
) -> None:
    with built(shape) as (root, path):
        before = state(root)
        readable = resolves_to_regular(path) and shape.size <= limit
        try:
            data = read_input(str(path), limit=limit)
        except BadInput as exc:
            assert not readable, exc
            assert exc.subject == str(path)
        else:
            assert readable
            assert data == (root / "thing").read_bytes()
        assert state(root) == before


@settings(max_examples=300, deadline=None)
@given(shape=shapes, force=st.booleans(), payload=st.binary(max_size=200))
def test_atomic_write_lands_whole_or_changes_nothing(
    shape: Shape, force: bool, payload: bytes
) -> None:
    with built(shape) as (root, path):
        before = state(root)
        regular_here = shape.kind == "regular" and not shape.via_symlink
        allowed = shape.kind == "missing" and not shape.via_symlink
        if regular_here:
            writable = bool(shape.mode & stat.S_IWUSR) and shape.links == 1
            allowed = force or writable
        try:
            atomic_write(path, payload, new_file_mode=0o600, force=force)
        except BadInput as exc:
            assert not allowed, exc
            assert exc.subject == str(path)
            assert state(root) == before
            return
        assert allowed
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode) and path.read_bytes() == payload
        expected_mode = shape.mode if regular_here else 0o600
        assert stat.S_IMODE(info.st_mode) == expected_mode
        after = state(root)
        # Other hard links keep the old text; nothing else appeared (no temp file).
        assert set(after) == set(before) | {path.name}
        for name, (_, _, body) in before.items():
            if name != path.name:
                assert after[name][2] == body


@settings(max_examples=150, deadline=None)
@given(old=st.binary(max_size=120), new=st.binary(max_size=120))
def test_update_file_backs_up_exactly_what_it_read(old: bytes, new: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="vmtrim-fuzz-") as top:
        path = Path(top) / "dom.xml"
        path.write_bytes(old)
        with update_file(path) as edit:
            assert edit.data == old
            backup = edit.replace(new)
        assert path.read_bytes() == new
        if old == new:
            assert backup is None
        else:
            assert backup is not None and backup.read_bytes() == old
            assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        assert len(list(Path(top).iterdir())) == (1 if backup is None else 2)
