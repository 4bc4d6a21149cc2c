"""The measured fact the granularity advice relies on, in one lab guest (one boot):
on 2 MiB qcow2 clusters, freeing scattered 64 KiB files gives the host next to nothing,
while freeing scattered 16 MiB files gives back most of them; and the guest is told
virtio-blk's default 512 B granularity, which is what the audit's device layer says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from granularity_support import LabDisk, LabGuest, MiB, booted, cell, guest_granularity
from vmtrim.audit.granularity import granularity_stack, suggested_device_granularity
from vmtrim.image.info import inspect
from vmtrim.sources.qemu_args import parse_qemu_command

DISK = LabDisk("c2m", 2 * MiB, "online")


@pytest.fixture(scope="module")
def guest() -> Iterator[LabGuest]:
    with booted([DISK]) as lab:
        yield lab


def test_the_guest_is_told_512_and_the_stack_says_so(guest: LabGuest) -> None:
    image = guest.images[DISK.name]
    argv = (
        f"qemu-system-x86_64 -machine pc -drive file={image},if=none,id=d0,format=qcow2,"
        "discard=unmap -device virtio-blk-pci,drive=d0"
    )
    disk = parse_qemu_command(argv).disks[0]
    layers = granularity_stack(disk, inspect(str(image), header_only=True), None)
    device = next(la for la in layers if la.layer == "device")
    assert device.bytes == guest_granularity(guest, DISK) == 512
    assert [la.bytes for la in layers if la.coarser] == [2 * MiB]
    assert suggested_device_granularity(layers) == 2 * MiB


def test_scattered_64k_frees_nothing_on_2m_clusters(guest: LabGuest) -> None:
    got = cell(guest, DISK, 64 << 10, count=64)
    assert got.guest_freed >= 64 * (64 << 10)  # the guest did free them
    assert got.host_freed <= got.guest_freed // 20, got.to_json()


def test_scattered_16m_frees_most_on_2m_clusters(guest: LabGuest) -> None:
    got = cell(guest, DISK, 16 * MiB, count=3)
    assert got.guest_freed >= 3 * 16 * MiB
    assert got.host_freed >= got.guest_freed * 3 // 4, got.to_json()
