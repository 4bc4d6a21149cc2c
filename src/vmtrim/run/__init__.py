"""Reclaim that keeps happening: the run policy, the run loop, its lock, schedule and watch."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.run.engine import execute, plan, process
    from vmtrim.run.lock import run_lock
    from vmtrim.run.policy import Policy, load_policy, parse_policy
    from vmtrim.run.record import Recorder, record_trim, record_verify

__all__ = [
    "Policy",
    "Recorder",
    "execute",
    "load_policy",
    "parse_policy",
    "plan",
    "process",
    "record_trim",
    "record_verify",
    "run_lock",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "execute": "vmtrim.run.engine",
        "plan": "vmtrim.run.engine",
        "process": "vmtrim.run.engine",
        "run_lock": "vmtrim.run.lock",
        "Policy": "vmtrim.run.policy",
        "load_policy": "vmtrim.run.policy",
        "parse_policy": "vmtrim.run.policy",
        "Recorder": "vmtrim.run.record",
        "record_trim": "vmtrim.run.record",
        "record_verify": "vmtrim.run.record",
    },
)
