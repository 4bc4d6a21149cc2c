"""Bad images: one line on stderr naming the file and the problem, exit code 2, no traceback.

And hypothesis: real images with mutated headers and tables never make anything
but ImageError escape, and are only ever opened read-only.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import qemu_img
from image_support import KiB, MiB, create, create_luks, peek, poke, qemu_io, qemu_map
from vmtrim.cli import run
from vmtrim.errors import ImageError
from vmtrim.image.info import inspect
from vmtrim.image.map import map_image


def _base(d: Path) -> Path:
    img = create(d / "base.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 128k", "write -P 2 2M 64k")
    return img


def _header_edit(offset: int, fmt: str, value: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = _base(d)
        poke(img, offset, fmt, value)
        return img

    return build


def _truncated_header(d: Path) -> Path:
    img = _base(d)
    os.truncate(img, 50)
    return img


def _truncated_tables(d: Path) -> Path:
    img = _base(d)
    l1 = peek(img, 40, "Q")
    l2 = peek(img, l1, "Q") & 0x00FFFFFFFFFFFE00
    os.truncate(img, l2 + 100)
    return img


def _wrong_magic(d: Path) -> Path:
    img = d / "notqcow.qcow2"
    img.write_bytes(b"QFI\xfa" + bytes(4092))
    # probe says raw for unknown magic; force qcow2 the way a caller naming the format would
    return img


def _l1_entry(value_of: Callable[[int], int]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = _base(d)
        l1 = peek(img, 40, "Q")
        poke(img, l1, "Q", value_of(peek(img, l1, "Q")))
        return img

    return build


def _reftable_entry(value_of: Callable[[int], int]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = _base(d)
        rt = peek(img, 48, "Q")
        poke(img, rt, "Q", value_of(peek(img, rt, "Q")))
        return img

    return build


def _backing_loop(d: Path) -> Path:
    a, b = d / "a.qcow2", d / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
    return a


def _backing_self(d: Path) -> Path:
    a = d / "self.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", a, "1M")
    return a


def _backing_missing(d: Path) -> Path:
    a = d / "orphan.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone/base.qcow2", "-F", "qcow2", a, "1M")
    return a


def _encrypted(d: Path) -> Path:
    return create_luks(d / "luks.qcow2", "1M")


def _directory(d: Path) -> Path:
    (d / "adir").mkdir()
    return d / "adir"


def _empty(d: Path) -> Path:
    img = d / "empty.qcow2"
    img.write_bytes(b"")
    return img


def _nonexistent(d: Path) -> Path:
    return d / "no-such.qcow2"


# name -> (builder, words the one-line message must contain, --format to force or None)
CASES: dict[str, tuple[Callable[[Path], Path], str, str | None]] = {
    "truncated-header": (_truncated_header, "truncated", None),
    "truncated-tables": (_truncated_tables, "past the end of the file", None),
    "wrong-magic": (_wrong_magic, "wrong magic", "qcow2"),
    "version-4": (_header_edit(4, "I", 4), "version 4", None),
    "cluster-bits-30": (_header_edit(20, "I", 30), "cluster_bits 30", None),
    "huge-size": (_header_edit(24, "Q", 1 << 62), "L1 table has", None),
    "refcount-order-7": (_header_edit(96, "I", 7), "refcount_order 7", None),
    "no-reftable": (_header_edit(56, "I", 0), "refcount_table_clusters", None),
    "l1-unaligned": (_header_edit(40, "Q", 0x30008), "not aligned", None),
    "l1-past-eof": (_header_edit(40, "Q", 1 << 40), "past the end", None),
    "reftable-unaligned": (_header_edit(48, "Q", 0x10200), "not aligned", None),
    "reftable-past-eof": (_header_edit(48, "Q", 1 << 40), "past the end", None),
    "l2-unaligned": (_l1_entry(lambda v: v + 512), "not aligned", None),
    "l2-past-eof": (_l1_entry(lambda v: (v & (1 << 63)) | (1 << 40)), "past the end", None),
    "refblock-unaligned": (_reftable_entry(lambda v: v + 512), "not aligned", None),
    "refblock-past-eof": (_reftable_entry(lambda v: 1 << 40), "past the end", None),
    "backing-loop": (_backing_loop, "loops back", None),
    "backing-self": (_backing_self, "loops back", None),
    "backing-missing": (_backing_missing, "not found", None),
    "encrypted": (_encrypted, "encrypted", None),
    "directory": (_directory, "directory", None),
    "empty": (_empty, "empty", "qcow2"),
    "nonexistent": (_nonexistent, "no such file", None),
}


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name, (build, _, _) in CASES.items():
        d = root / name
        d.mkdir()
        out[name] = build(d)
    return out


@pytest.mark.parametrize("command", ["info", "map"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_image_one_line_exit_2(
    bad_images: dict[str, Path], case: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, words, fmt = CASES[case]
    args = ["image", command, "--json", str(bad_images[case])]
    if fmt:
        args[2:2] = ["-f", fmt]
    assert run(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vmtrim: ")
    assert bad_images[case].name in lines[0]
    assert words in lines[0]
    assert "Traceback" not in err


def test_empty_file_probed_as_raw_is_an_empty_disk(bad_images: dict[str, Path]) -> None:
    # without -f, an empty file is an empty raw disk, as qemu-img info says
    info = inspect(bad_images["empty"])
    assert (info.format, info.virtual_size) == ("raw", 0)
    q = qemu_img("info", "--output=json", bad_images["empty"]).stdout
    assert '"virtual-size": 0' in q


def test_unreadable_path_as_unprivileged_user(tmp_path: Path) -> None:
    img = _base(tmp_path)
    img.chmod(0o000)
    # Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: the file's mode applies, while the
    # checkout and the venv stay readable wherever they are (a setuid to nobody would need
    # every directory above them to be world-readable).
    proc = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            sys.executable,
            "-m",
            "vmtrim",
            "image",
            "info",
            str(img),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"vmtrim: {img}: permission denied (cannot open for reading)"


def test_protocol_backing_is_reported_not_followed(tmp_path: Path) -> None:
    img = tmp_path / "nbd-top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", "nbd://127.0.0.1:10809/x", "-F", "raw", img, "1M"
    )
    assert inspect(img, follow_backing=False).backing_file == "nbd://127.0.0.1:10809/x"
    with pytest.raises(ImageError, match="protocol"):
        inspect(img)


# -- hypothesis: mutate real images -------------------------------------------


def _regions(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the header and every table of a qcow2, to aim mutations at."""
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    (l1_off,) = struct.unpack_from(">Q", data, 40)
    (l1_size,) = struct.unpack_from(">I", data, 36)
    (rt_off,) = struct.unpack_from(">Q", data, 48)
    regions = [(0, 112), (l1_off, l1_size * 8), (rt_off, cs)]
    for i in range(l1_size):
        (l2,) = struct.unpack_from(">Q", data, l1_off + 8 * i)
        if l2 & 0x00FFFFFFFFFFFE00:
            regions.append((l2 & 0x00FFFFFFFFFFFE00, cs))
    (rb,) = struct.unpack_from(">Q", data, rt_off)
    regions.append((rb, cs))
    (snap_off,) = struct.unpack_from(">Q", data, 64)
    if snap_off:
        regions.append((snap_off, 256))
    return regions


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    d = tmp_path_factory.mktemp("seeds")
    plain = create(d / "plain.qcow2", 1 * MiB, cluster_size="4k")
    qemu_io(plain, "write -P 1 0 64k", "write -c -P 2 256k 8k", "write -z 512k 4k")
    qemu_img("snapshot", "-c", "s", plain)
    qemu_io(plain, "write -P 3 0 4k")
    ext = create(d / "ext.qcow2", 1 * MiB, cluster_size="16k", extended_l2="on")
    qemu_io(ext, "write -P 1 0 2k", "write -z 4k 1k", "write -P 2 600k 16k")
    v2 = create(d / "v2.qcow2", 1 * MiB, compat="0.10", cluster_size="4k")
    qemu_io(v2, "write -P 1 100k 20k")
    return [p.read_bytes() for p in (plain, ext, v2)]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_images_raise_only_image_error(
    seeds: list[bytes], scratch: Path, data: st.DataObject
) -> None:
    seed = data.draw(st.sampled_from(range(len(seeds))), label="seed")
    image = bytearray(seeds[seed])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        regions = _regions(bytes(seeds[seed]))
        start, length = data.draw(st.sampled_from(regions), label="region")
        pos = start + data.draw(st.integers(0, max(0, length - 1)), label="pos")
        new = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        image[pos : pos + len(new)] = new
    if data.draw(st.booleans(), label="truncate"):
        del image[data.draw(st.integers(0, len(image)), label="cut") :]
    path = scratch / "mutant.qcow2"
    path.write_bytes(bytes(image))
    for action in (lambda: inspect(path, fmt="qcow2"), lambda: map_image(path, "qcow2")):
        try:
            action()
        except ImageError as exc:
            assert str(path) in exc.one_line()
            assert "\n" not in exc.one_line()


def test_images_are_opened_read_only(tmp_path: Path) -> None:
    """Every open of the image (audit hook on os.open/open) asks for O_RDONLY."""
    img = _base(tmp_path)
    shutil.copy(img, tmp_path / "copy.qcow2")
    seen: list[tuple[str, int]] = []
    watching = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if watching[0] and event == "open" and str(args[0]).endswith(".qcow2"):
            flags = args[2] if isinstance(args[2], int) else -1
            mode = args[1] if isinstance(args[1], str) else ""
            seen.append((mode, flags))

    sys.addaudithook(hook)
    try:
        inspect(tmp_path / "copy.qcow2", scan_zeros=True)
        map_image(tmp_path / "copy.qcow2")
    finally:
        watching[0] = False
    assert seen
    for mode, flags in seen:
        assert flags != -1 and flags & os.O_ACCMODE == os.O_RDONLY, (mode, flags)


def test_long_backing_chain(tmp_path: Path) -> None:
    # 20 layers: no recursion limit, and the map still matches qemu-img's
    prev = create(tmp_path / "l0.qcow2", 1 * MiB)
    for i in range(1, 20):
        cur = tmp_path / f"l{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", cur, "1M")
        prev = cur
    qemu_io(prev, f"write -P 1 0 {4 * KiB}")
    assert len(inspect(prev).chain()) == 20
    assert list(map_image(prev).rows()) == qemu_map(prev)
