"""vmtrim: make thin-provisioned VM disks give freed space back to the host.

The package is a library first; :mod:`vmtrim.cli` is a thin layer over it.
"""

__version__ = "0.1.0"
