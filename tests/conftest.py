"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import start_libvirtd
from vmtrim.lab import Appliance, ensure_appliance


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """The real libvirtd (started here if none runs); yields its URI, qemu:///system."""
    daemons = start_libvirtd()
    try:
        yield daemons.uri
    finally:
        daemons.stop()


@pytest.fixture(scope="session")
def appliance() -> Appliance:
    """The lab guest, built on first use (downloads Debian's kernel package on a fresh machine)."""
    return ensure_appliance()
