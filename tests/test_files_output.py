"""`fix -o` and `fix --in-place` against hostile targets: links, devices, FIFOs, other users.

Every refusal is one line on stderr naming the file and exit 2, with nothing written
anywhere: the tests compare whole directory listings and file contents before and after.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from files_support import NOBODY, as_nobody, one_line, vmtrim
from fix_support import materialize
from vmtrim._util.files import MAX_INPUT_BYTES

VICTIM_TEXT = b"root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def dom_xml(tmp_path: Path) -> Path:
    """A domain whose fix changes one line, in its own directory."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "dom.xml"
    path.write_text(materialize("design-scsi-nodriver.xml", tmp_path, images=False))
    return path


def snapshot(*dirs: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``dirs``: its mode and its bytes (or link target)."""
    seen: dict[str, tuple[int, bytes | str]] = {}
    for top in dirs:
        for entry in [top, *sorted(top.rglob("*"))]:
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                seen[str(entry)] = (st.st_mode, os.readlink(entry))
            elif stat.S_ISREG(st.st_mode):
                seen[str(entry)] = (st.st_mode, entry.read_bytes())
            else:
                seen[str(entry)] = (st.st_mode, b"")
    return seen


# ---------------------------------------------------------------- links


def test_link_planted_by_nobody_in_a_sticky_dir_is_refused(dom_xml: Path, tmp_path: Path) -> None:
    """Root runs `fix -o /tmp/x/out.xml`; user nobody made out.xml a link to a root file."""
    victim_dir = tmp_path / "etc"
    victim_dir.mkdir()
    victim = victim_dir / "passwd"
    victim.write_bytes(VICTIM_TEXT)
    # A fresh sticky, world-writable directory like /tmp (pytest's own is 0700 to root).
    sticky = Path(tempfile.mkdtemp(prefix="vmtrim-sticky-", dir="/tmp"))
    try:
        os.chmod(sticky, 0o1777)
        out = sticky / "out.xml"
        as_nobody("ln", "-s", str(victim), str(out))
        assert out.lstat().st_uid == NOBODY  # the link really is another user's
        before = snapshot(victim_dir, sticky)
        result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(out))
        assert result.returncode == 2, result.stderr
        assert "symbolic link" in one_line(result, out)
        assert snapshot(victim_dir, sticky) == before
        assert victim.read_bytes() == VICTIM_TEXT
    finally:
        shutil.rmtree(sticky)


def test_directory_link_planted_by_nobody_in_a_sticky_dir_is_refused(
    dom_xml: Path, tmp_path: Path
) -> None:
    """`fix -o /tmp/x/etc/passwd` where nobody made /tmp/x/etc a link to the real /etc."""
    victim_dir = tmp_path / "etc"
    victim_dir.mkdir()
    (victim_dir / "passwd").write_bytes(VICTIM_TEXT)
    sticky = Path(tempfile.mkdtemp(prefix="vmtrim-sticky-", dir="/tmp"))
    try:
        os.chmod(sticky, 0o1777)
        as_nobody("ln", "-s", str(victim_dir), str(sticky / "etc"))
        (sticky / "mine").symlink_to(victim_dir)  # root's own link there is fine
        before = snapshot(victim_dir, sticky)
        out = sticky / "etc" / "passwd"
        result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(out))
        assert result.returncode == 2, result.stderr
        assert str(sticky / "etc") in one_line(result, out)
        assert snapshot(victim_dir, sticky) == before
        ok = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(sticky / "mine/new.xml"))
        assert ok.returncode == 0, ok.stderr
        assert b"discard='unmap'" in (victim_dir / "new.xml").read_bytes()
    finally:
        shutil.rmtree(sticky)


def test_in_place_through_a_link_is_refused(dom_xml: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.xml"
    link.symlink_to(dom_xml)
    before = snapshot(tmp_path)
    result = vmtrim("fix", "--no-probe", "--xml", str(link), "--in-place")
    assert result.returncode == 2
    assert "symbolic link" in one_line(result, link)
    assert snapshot(tmp_path) == before


def test_dangling_link_as_output_creates_nothing(dom_xml: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.xml"
    out.symlink_to(tmp_path / "created-through-the-link.xml")
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(out))
    assert result.returncode == 2
    one_line(result, out)
    assert not (tmp_path / "created-through-the-link.xml").exists() and out.is_symlink()


def test_a_linked_parent_directory_is_still_followed(dom_xml: Path, tmp_path: Path) -> None:
    """Only the last component is refused: /var/run -> /run style paths keep working."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(tmp_path / "alias/o.xml"))
    assert result.returncode == 0, result.stderr
    assert b"discard='unmap'" in (real / "o.xml").read_bytes()


# ---------------------------------------------------------------- not regular files


@pytest.mark.parametrize("kind", ["/dev/full", "/dev/null", "fifo", "directory", "/proc/self/mem"])
def test_output_that_is_not_a_regular_file(dom_xml: Path, tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)  # no reader: opening it to write (or read) would block forever
    elif kind == "directory":
        target = tmp_path / "outdir"
        target.mkdir()
    else:
        target = Path(kind)
    before = snapshot(tmp_path)
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(target))
    assert result.returncode == 2, result.stderr
    one_line(result, target)
    assert snapshot(tmp_path) == before


def test_output_in_a_missing_directory_is_bad_input(dom_xml: Path, tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "out.xml"
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(out))
    assert result.returncode == 2
    one_line(result, out)


# ---------------------------------------------------------------- what --in-place keeps


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".vmtrim-*.bak"))


def test_in_place_keeps_mode_owner_and_xattrs_backup_is_0600(dom_xml: Path) -> None:
    os.chmod(dom_xml, 0o640)
    os.chown(dom_xml, 4321, 4322)
    label = b"system_u:object_r:virt_content_t:s0\0"
    os.setxattr(dom_xml, "user.origin", b"virsh dumpxml")
    os.setxattr(dom_xml, "security.selinux", label)
    os.setxattr(dom_xml, "trusted.vmtrim-test", b"1")
    original = dom_xml.read_bytes()
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "--in-place")
    assert result.returncode == 0, result.stderr
    info = dom_xml.stat()
    assert b"discard='unmap'" in dom_xml.read_bytes()
    assert stat.S_IMODE(info.st_mode) == 0o640 and (info.st_uid, info.st_gid) == (4321, 4322)
    assert os.getxattr(dom_xml, "user.origin") == b"virsh dumpxml"
    assert os.getxattr(dom_xml, "security.selinux") == label
    assert os.getxattr(dom_xml, "trusted.vmtrim-test") == b"1"
    (backup,) = backups(dom_xml)
    assert backup.read_bytes() == original
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert sorted(p.name for p in dom_xml.parent.iterdir()) == sorted([dom_xml.name, backup.name])


def test_output_over_an_existing_file_keeps_its_mode_and_backs_it_up(
    dom_xml: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.xml"
    out.write_bytes(b"<domain>older output</domain>\n")
    os.chmod(out, 0o604)
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o604
    (backup,) = backups(out)
    assert backup.read_bytes() == b"<domain>older output</domain>\n"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


def test_read_only_file_is_refused_unless_forced(dom_xml: Path) -> None:
    os.chmod(dom_xml, 0o444)
    before = snapshot(dom_xml.parent)
    refused = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "--in-place")
    assert refused.returncode == 2
    assert "read-only" in one_line(refused, dom_xml)
    assert snapshot(dom_xml.parent) == before
    forced = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "--in-place", "--force")
    assert forced.returncode == 0, forced.stderr
    assert b"discard='unmap'" in dom_xml.read_bytes()
    assert stat.S_IMODE(dom_xml.stat().st_mode) == 0o444  # still read-only afterwards
    assert len(backups(dom_xml)) == 1


def test_hard_link_is_refused_unless_forced_and_then_broken(dom_xml: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-name.xml"
    os.link(dom_xml, other)
    original = dom_xml.read_bytes()
    before = snapshot(tmp_path)
    refused = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "--in-place")
    assert refused.returncode == 2
    assert "hard links" in one_line(refused, dom_xml)
    assert snapshot(tmp_path) == before
    forced = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "--in-place", "--force")
    assert forced.returncode == 0, forced.stderr
    assert b"discard='unmap'" in dom_xml.read_bytes()
    assert other.read_bytes() == original  # the link is broken, as documented
    assert dom_xml.stat().st_ino != other.stat().st_ino


def test_an_image_given_as_output_by_mistake_is_left_alone(dom_xml: Path, tmp_path: Path) -> None:
    """An existing -o target bigger than any domain XML is not replaced (nor read whole)."""
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)
    before = snapshot(tmp_path)
    result = vmtrim("fix", "--no-probe", "--xml", str(dom_xml), "-o", str(image))
    assert result.returncode == 2, result.stderr
    assert one_line(result, image).startswith("larger than")
    assert snapshot(tmp_path) == before
