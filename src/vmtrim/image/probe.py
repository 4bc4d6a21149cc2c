"""Which image format a file holds, decided the way ``qemu-img`` decides it.

QEMU's ``bdrv_probe`` (block.c) reads the first 2048 bytes and asks every driver's
probe function for a score; the highest wins and raw, scoring 1, only wins when no
other format claims the file. The probes below restate those functions' tests
(block/qcow.c, qcow2.c, qed.c, vdi.c, vmdk.c, vpc.c, vhdx.c, parallels.c, bochs.c,
cloop.c, dmg.c, crypto.c) so that a VMDK or a VHD is never read as a raw disk full
of data. vmtrim reads qcow2 and raw; any other format is refused with one line.
"""

from __future__ import annotations

import os
import struct

PROBE_BYTES = 2048  # BLOCK_PROBE_BUF_SIZE

# QEMU driver name -> what to call it in a message
NAMES = {
    "qcow": "qcow (version 1)",
    "qed": "QED",
    "vdi": "VDI (VirtualBox)",
    "vmdk": "VMDK",
    "vpc": "VHD (vpc)",
    "vhdx": "VHDX",
    "parallels": "Parallels",
    "bochs": "Bochs",
    "cloop": "cloop",
    "dmg": "DMG",
    "luks": "LUKS",
}
READABLE = ("qcow2", "raw")

_CLOOP_V2 = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


def _cstr(buf: bytes, offset: int, size: int) -> bytes:
    """A NUL-terminated C string field (strcmp reads up to the first NUL)."""
    field = buf[offset : offset + size]
    return field.split(b"\0", 1)[0] if b"\0" in field else b"\xff"  # unterminated: no match


def _vmdk_descriptor(buf: bytes) -> bool:
    """vmdk_probe on a text descriptor: comments and blank lines, then ``version=N``."""
    p = 0
    end = len(buf)
    while p < end:
        if buf[p : p + 1] == b"#":
            nl = buf.find(b"\n", p)
            if nl < 0:
                return False
            p = nl + 1
            continue
        if buf[p : p + 1] == b" ":
            while p < end and buf[p : p + 1] == b" ":
                p += 1
            if buf[p : p + 1] == b"\n":
                p += 1
                continue
        for version in (b"1", b"2", b"3"):
            for eol in (b"\n", b"\r\n"):
                if buf.startswith(b"version=" + version + eol, p):
                    return True
        return False
    return False


def _scores(buf: bytes, filename: str) -> dict[str, int]:
    n = len(buf)
    be32 = struct.unpack_from(">I", buf, 4)[0] if n >= 8 else -1
    scores = {"raw": 1}
    if n >= 48 and buf[:4] == b"QFI\xfb" and be32 == 1:
        scores["qcow"] = 100
    if n >= 104 and buf[:4] == b"QFI\xfb" and be32 >= 2:
        scores["qcow2"] = 100
    if n >= 64 and buf[:4] == b"QED\0":
        scores["qed"] = 100
    if n >= 512 and struct.unpack_from("<I", buf, 64)[0] == 0xBEDA107F:
        scores["vdi"] = 100
    if n >= 4 and (buf[:4] in (b"COWD", b"KDMV") or _vmdk_descriptor(buf)):
        scores["vmdk"] = 100
    if n >= 8 and buf[:8] == b"conectix":
        scores["vpc"] = 100
    if n >= 8 and buf[:8] == b"vhdxfile":
        scores["vhdx"] = 100
    if (
        n >= 64
        and buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
        and struct.unpack_from("<I", buf, 16)[0] == 2
    ):
        scores["parallels"] = 100
    if (
        n >= 512
        and _cstr(buf, 0, 32) == b"Bochs Virtual HD Image"
        and _cstr(buf, 32, 16) == b"Redolog"
        and _cstr(buf, 48, 16) == b"Growing"
        and struct.unpack_from("<I", buf, 64)[0] in (0x00020000, 0x00010000)
    ):
        scores["bochs"] = 100
    if buf.startswith(_CLOOP_V2):
        scores["cloop"] = 2
    if len(filename) > 4 and filename.endswith(".dmg"):
        scores["dmg"] = 2  # dmg_probe looks at the name only
    if n >= 8 and buf[:6] == b"LUKS\xba\xbe" and struct.unpack_from(">H", buf, 6)[0] == 1:
        scores["luks"] = 100
    return scores


def probe_fd(fd: int, filename: str) -> str:
    """QEMU's driver name for the open file ``fd`` (an empty file is raw, as in QEMU)."""
    head = os.pread(fd, PROBE_BYTES, 0)
    if not head:
        return "raw"
    # QEMU reads the probe buffer through the block layer, which fills past EOF with
    # zeros, so every probe sees 2048 bytes however short the file is
    scores = _scores(head.ljust(PROBE_BYTES, b"\0"), filename)
    return max(scores, key=lambda name: scores[name])
