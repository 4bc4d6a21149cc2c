"""The lab appliance: a tiny guest (kernel + initramfs) that verify and the tests boot.

:func:`ensure_appliance` returns the cached build for the current inputs and
builds it on first use; see :mod:`vmtrim.lab.build` for the cache and
``init.sh`` for what the guest does.
"""

from vmtrim.lab.build import Appliance, cache_root, ensure_appliance

__all__ = ["Appliance", "cache_root", "ensure_appliance"]
