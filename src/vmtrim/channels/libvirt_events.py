"""libvirt's default event loop, run once per process (keepalive and domain events need it)."""

from __future__ import annotations

import threading
import time

from vmtrim.channels.libvirt import libvirt_module

_loop_lock = threading.Lock()
_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread; once per process, before connecting."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt = libvirt_module()
        libvirt.virEventRegisterDefaultImpl()
        # A 1 s tick keeps virEventRunDefaultImpl from sleeping forever on an idle host.
        libvirt.virEventAddTimeout(1000, lambda timer, opaque: None, None)

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    time.sleep(0.1)

        threading.Thread(target=run, name="vmtrim-libvirt-events", daemon=True).start()
        _loop_started = True
