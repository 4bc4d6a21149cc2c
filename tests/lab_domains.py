"""The lab-guest fixture the run and watch tests share (the guests are test_live_libvirt's).

Import the fixture into a test module (``from lab_domains import lab``); it is
module-scoped there: the guests of one module boot once and are destroyed and
undefined after its last test, whatever happens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import libvirt
import pytest

from test_live_libvirt import Lab
from vmtrim.lab import Appliance

# Lab names every guest vmtrim-live-<pid>-<tag>: a policy including this glob selects
# only this session's guests on a libvirtd other sessions share.
OURS = f"vmtrim-live-{os.getpid()}-"


@pytest.fixture(scope="module")
def lab(libvirtd: str, appliance: Appliance) -> Iterator[Lab]:
    conn = libvirt.open(libvirtd)
    labs = Lab(conn, appliance)
    try:
        yield labs
    finally:
        labs.cleanup()
        conn.close()
