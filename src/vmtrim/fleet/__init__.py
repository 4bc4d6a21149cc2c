"""Many libvirt hosts at once, over libvirt's own remote transports; each failure its host's."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.fleet.hosts import Fleet, HostRun, connect_host, host_list, read_hosts_file
    from vmtrim.fleet.trim import FleetTarget, trim_fleet

__all__ = [
    "Fleet",
    "FleetTarget",
    "HostRun",
    "connect_host",
    "host_list",
    "read_hosts_file",
    "trim_fleet",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "Fleet": "vmtrim.fleet.hosts",
        "HostRun": "vmtrim.fleet.hosts",
        "connect_host": "vmtrim.fleet.hosts",
        "host_list": "vmtrim.fleet.hosts",
        "read_hosts_file": "vmtrim.fleet.hosts",
        "FleetTarget": "vmtrim.fleet.trim",
        "trim_fleet": "vmtrim.fleet.trim",
    },
)
