"""Run a call that may hang (a guest agent, a libvirt call) with a hard deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vmtrim.errors import AgentUnavailable

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; raise AgentUnavailable if it is not done in time.

    The thread is abandoned, not killed: a hung agent call in libvirt or in a socket
    read cannot be interrupted from Python, but it must not hold up the run.
    """
    if seconds <= 0:
        raise AgentUnavailable(f"{what}: no time left")
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"vmtrim-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AgentUnavailable(f"{what}: no answer within {seconds:.3g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
