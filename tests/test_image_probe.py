"""Format probing agrees with qemu-img's: only real raw is read as raw.

Every format qemu-img can create is made with qemu-img; bochs, cloop and dmg (which
it only reads) are written from their drivers' header layouts. qemu-img info is the
judge of what each file is. Anything but qcow2 and raw exits 2 with one line.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_support import MiB, create, create_luks, qemu_img_info
from vmtrim.cli import run
from vmtrim.errors import ImageError
from vmtrim.image.info import inspect, probe_format


def _bochs(d: Path) -> Path:
    h = bytearray(512)
    h[0:23] = b"Bochs Virtual HD Image\0"
    h[32:40] = b"Redolog\0"
    h[48:56] = b"Growing\0"
    # version 2, header 512 B, 1 catalog entry, 1 bitmap block, 4 KiB extents, 4 KiB disk
    struct.pack_into("<IIIIIIQ", h, 64, 0x00020000, 512, 1, 1, 4096, 0, 4096)
    path = d / "disk.bochs"
    path.write_bytes(bytes(h) + b"\xff" * 4)  # the one extent is unallocated
    return path


def _cloop(d: Path) -> Path:
    magic = (
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    )
    # 512 B blocks, 1 block; offsets of its start and end; a 16-byte compressed block
    body = magic.ljust(128, b"\0") + struct.pack(">IIQQ", 512, 1, 152, 168) + bytes(16)
    path = d / "disk.cloop"
    path.write_bytes(body)
    return path


def _dmg(d: Path) -> Path:
    # dmg_probe goes by the name alone: qemu-img reads any *.dmg as DMG and refuses it
    path = d / "plain-bytes.dmg"
    path.write_bytes(b"not a disk " * 100)
    return path


def _made(fmt: str, **opts: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        return create(d / f"disk.{fmt}", 4 * MiB, fmt, **opts)

    return build


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "vpc": _made("vpc"),
    "vmdk": _made("vmdk"),
    "vmdk-descriptor": _made("vmdk", subformat="monolithicFlat"),
    "vmdk-stream": _made("vmdk", subformat="streamOptimized"),
    "vhdx": _made("vhdx"),
    "parallels": _made("parallels"),
    "qcow": _made("qcow"),
    "qed": _made("qed"),
    "vdi": _made("vdi"),
    "luks": lambda d: create_luks(d / "disk.luks", 4 * MiB, fmt="luks"),
    "bochs": _bochs,
    "cloop": _cloop,
    "dmg": _dmg,
}


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, build in BUILDERS.items():
        d = root / name
        d.mkdir()
        out[name] = build(d)
    return out


def _qemu_format(path: Path) -> str | None:
    import json

    proc = qemu_img_info(path)
    if proc.returncode:
        return None
    fmt: str = json.loads(proc.stdout)["format"]
    return fmt


@pytest.mark.parametrize("case", list(BUILDERS))
def test_probe_names_the_format_qemu_img_names(others: dict[str, Path], case: str) -> None:
    path = others[case]
    expected = _qemu_format(path)
    if case == "dmg":
        # qemu-img cannot open it, which is the point: it probed DMG, not raw
        assert expected is None
        expected = "dmg"
    assert probe_format(str(path)) == expected


@pytest.mark.parametrize("command", ["info", "map"])
@pytest.mark.parametrize("case", list(BUILDERS))
def test_other_formats_exit_2_with_one_line(
    others: dict[str, Path], case: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = others[case]
    assert run(["image", command, "--json", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"vmtrim: {path}: ")
    assert err.rstrip().endswith("image: not supported, use qemu-img")


def test_backing_file_in_another_format_is_refused(others: dict[str, Path], tmp_path: Path) -> None:
    base = others["vmdk"]
    top = tmp_path / "top.qcow2"
    create(top, 4 * MiB, backing_file=str(base), backing_fmt="vmdk")
    with pytest.raises(ImageError, match="VMDK image: not supported") as exc:
        inspect(top)
    assert exc.value.subject == str(base)


def test_real_raw_is_still_raw(tmp_path: Path) -> None:
    raw = create(tmp_path / "disk.img", 4 * MiB, "raw")
    raw.write_bytes(b"just bytes" * 1000)
    # a fixed VHD is raw data with a footer, and qemu-img probes it as raw too
    fixed = create(tmp_path / "fixed.vhd", 4 * MiB, "vpc", subformat="fixed")
    for path in (raw, fixed):
        assert _qemu_format(path) == "raw"
        assert inspect(path).format == "raw"


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_headers_probe_as_qemu_img_probes(
    others: dict[str, Path], scratch: Path, data: st.DataObject
) -> None:
    """Garbage made from another format's header: never read as raw unless qemu-img does."""
    case = data.draw(st.sampled_from(sorted(BUILDERS)), label="format")
    image = bytearray(others[case].read_bytes()[: 64 * 1024])
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        pos = data.draw(st.integers(0, min(len(image), 2048) - 1), label="pos")
        new = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        image[pos : pos + len(new)] = new
    path = scratch / others[case].name
    path.write_bytes(bytes(image))
    theirs = _qemu_format(path)
    ours = probe_format(str(path))
    if theirs is not None:
        assert ours == theirs
    if ours == "raw":
        assert theirs == "raw"  # qemu-img opens any raw file
    try:
        info = inspect(path)
    except ImageError as exc:
        assert "\n" not in exc.one_line()
    else:
        assert info.format in ("qcow2", "raw") and ours == info.format
