"""Fuzz the readers of what a guest answers through guest-exec: sysfs queues, fstrim.service,
/etc/fstab, guest-get-devices.

The guest is untrusted. Whatever it prints, the readers return model values or notes:
never an exception, never a value sysfs could not have printed, never more than
:data:`OUTPUT_LIMIT` bytes read. Honest output (the shape the guest's script prints)
reads back exactly.
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vmtrim.channels.qmp import ExecStatus
from vmtrim.errors import AgentUnavailable
from vmtrim.model import Domain, Origin
from vmtrim.sources.libvirt_live import (
    OUTPUT_LIMIT,
    fstrim_scope,
    guest_device,
    guest_facts,
    parse_devices,
    parse_exec_start,
    parse_fstab,
    parse_queues,
    parse_timer,
)
from vmtrim.sources.libvirt_xml import parse_domain_xml

names = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8).map(
    lambda s: "v" + s
)
words = st.text(string.printable, max_size=40)
# Lines the way the guest's script prints them, and lines it could not have printed.
queue_lines = st.one_of(
    st.builds(
        lambda a, p, d, kv: f"vmtrim-queue {a} {p} {d} " + " ".join(f"{k}={v}" for k, v in kv),
        st.one_of(names, words, st.just("-")),
        st.one_of(names, words),
        st.one_of(names, words),
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "discard_granularity",
                        "discard_max_bytes",
                        "rotational",
                        "alignment_offset",
                        "start",
                    ]
                ),
                st.one_of(st.integers(-(2**70), 2**70).map(str), words),
            ),
            max_size=6,
        ),
    ),
    words,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(queue_lines, max_size=20),
    st.lists(st.tuples(st.one_of(names, st.just("-")), names), max_size=4),
)
def test_any_queue_output_gives_sane_values_or_notes(
    lines: list[str], asked: list[tuple[str, str]]
) -> None:
    found, notes = parse_queues("\n".join(lines).encode("utf-8", "surrogatepass"), asked)
    assert set(found) <= set(asked)
    for queue in found.values():
        assert queue.device.isprintable() and " " not in queue.device
        for value in (queue.discard_granularity, queue.discard_max_bytes, queue.alignment_offset):
            assert value is None or 0 <= value < 10**20
        assert queue.rotational in (None, True, False)
        # sectors in, bytes out: never past what a disk can address
        start = queue.partition_start
        assert start is None or (0 <= start < 2**64 and start % 512 == 0)
        assert queue.partition in {p for _, p in asked}
    assert all(isinstance(n, str) and len(n) < 2000 for n in notes)


@given(
    st.lists(
        st.tuples(
            names,
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.sampled_from([0, 1]),
            st.integers(0, 2**55 - 1),  # a partition's start sector
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[0],
    )
)
def test_honest_queue_output_reads_back_exactly(
    disks: list[tuple[str, int, int, int, int]],
) -> None:
    out = "".join(
        f"vmtrim-queue - {d}1 {d} discard_granularity={g} discard_max_bytes={m}"
        f" discard_zeroes_data= rotational={r} alignment_offset=0 discard_alignment=0"
        f" start={s}\n"
        for d, g, m, r, s in disks
    )
    found, notes = parse_queues(out.encode(), [("-", f"{d}1") for d, *_ in disks])
    assert notes == []
    for d, g, m, r, s in disks:
        q = found[("-", f"{d}1")]
        assert (q.device, q.discard_granularity, q.discard_max_bytes) == (d, g, m)
        assert (q.partition, q.partition_start) == (f"{d}1", s * 512)
        assert q.rotational is bool(r)
        assert q.discard_zeroes_data is None  # absent file: empty value


def test_a_huge_answer_is_cut_and_said() -> None:
    line = b"vmtrim-queue sda sda sda discard_max_bytes=0\n"
    found, notes = parse_queues(line + b"x" * (3 << 20), [("sda", "sda")])
    assert found[("sda", "sda")].discard_max_bytes == 0
    assert any(f"more than {OUTPUT_LIMIT} bytes" in n for n in notes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.one_of(st.none(), st.integers(-5, 300)))
def test_any_timer_output_gives_facts(out: bytes, exitcode: int | None) -> None:
    facts = parse_timer(out, exitcode)
    assert facts.scope in (None, "all", "fstab", "listed", "unknown")
    assert facts.command is None or (len(facts.command) <= 1024 and facts.command.isprintable())
    if not facts.enabled:
        assert facts.scope is None


fstab_entries = st.lists(
    st.tuples(
        st.text(string.ascii_letters + string.digits + "/ _-", min_size=1, max_size=20).map(
            lambda s: "/" + s.strip()
        ),
        st.booleans(),
    ),
    max_size=6,
)


@given(fstab_entries)
def test_fstab_mountpoints_with_escapes(entries: list[tuple[str, bool]]) -> None:
    text = "# comment\n\n" + "".join(
        f"UUID=x {mp.replace(' ', chr(92) + '040')} ext4 defaults"
        f"{',X-fstrim.notrim' if skip else ''} 0 2\n"
        for mp, skip in entries
    )
    expected = tuple(dict.fromkeys(mp for mp, skip in entries if not skip))
    assert parse_fstab(text) == expected


tokens = st.sampled_from(
    ["-a", "-A", "-v", "-Av", "--all", "--fstab", "--listed-in", "-I", "/etc/fstab",
     "/etc/fstab:/proc/self/mountinfo", "/proc/self/mountinfo", "/srv", "-m", "1M",
     "--verbose", "--quiet-unsupported", "'", '"', "--listed-in=/x", "-o"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda p, a: " ".join([p, *a]),
            st.sampled_from(["/sbin/fstrim", "fstrim", "/usr/local/bin/trim.sh", ""]),
            st.lists(tokens, max_size=6),
        ),
        max_size=3,
    ),
    st.lists(st.sampled_from(["/", "/home", "/srv"]), max_size=3).map(tuple),
)
def test_any_fstrim_command_has_a_scope(commands: list[str], fstab: tuple[str, ...]) -> None:
    scope, only = fstrim_scope(commands, fstab)
    assert scope in ("all", "fstab", "listed", "unknown")
    if scope in ("all", "unknown"):
        assert only == ()
    if scope == "fstab":
        assert set(fstab) | {"/"} <= set(only)


def test_exec_start_resets_and_drop_ins() -> None:
    fragment = "[Unit]\nDescription=x\n[Service]\nExecStart=/sbin/fstrim --fstab --verbose\n"
    dropin = "[Service]\nExecStart=\nExecStart=-/sbin/fstrim --all\n"
    assert parse_exec_start([fragment]) == ["/sbin/fstrim --fstab --verbose"]
    assert parse_exec_start([fragment, dropin]) == ["/sbin/fstrim --all"]
    assert fstrim_scope(parse_exec_start([fragment, dropin]), ("/srv",)) == ("all", ())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@given(json_values, st.text(max_size=80))
def test_any_fsinfo_disk_entry_gives_a_kernel_name_or_none(entry: Any, name: str) -> None:
    pair = guest_device(entry if isinstance(entry, dict) else {"dev": entry}, name)
    if pair is not None:
        disk, part = pair
        assert "/" not in disk and "/" not in part and part != "-"
        assert len(disk) <= 64 and len(part) <= 64


@given(st.one_of(json_values, st.lists(st.fixed_dictionaries({"driver-name": json_values}))))
def test_any_devices_reply_gives_short_pairs(ret: Any) -> None:
    for name, version in parse_devices(ret):
        assert isinstance(name, str) and isinstance(version, str)
        assert len(name) <= 64 and len(version) <= 64


XML = """<domain><name>g</name><devices><disk type='file'><driver name='qemu' type='raw'/>
<source file='/x.img'/><target dev='vda' bus='virtio'/><serial>s1</serial></disk>
</devices></domain>"""


class HostileAgent:
    """Plumbing for the fuzz: the agent replies are the examples'; sh's output too."""

    def __init__(self, osinfo: Any, name: Any, dev: Any, out: bytes) -> None:
        self.osinfo, self.name, self.dev, self.out = osinfo, name, dev, out

    def execute(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        if command == "guest-get-osinfo":
            return self.osinfo
        disk = {"bus-type": "virtio", "serial": "s1", "dev": self.dev}
        return [{"name": self.name, "mountpoint": "/", "type": "ext4", "disk": [disk]}]

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus:
        return ExecStatus(exited=True, exitcode=0, out_data=self.out)


@settings(max_examples=150, deadline=None)
@given(json_values, json_values, json_values, st.binary(max_size=2048))
def test_hostile_replies_end_in_the_model_or_notes(
    osinfo: Any, name: Any, dev: Any, out: bytes
) -> None:
    domain: Domain = parse_domain_xml(XML)
    assert domain.origin is Origin.LIBVIRT_XML
    guest_facts(HostileAgent(osinfo, name, dev, out), domain, XML, 5.0)
    assert domain.guest is not None
    assert domain.guest.os_id is None or len(domain.guest.os_id) <= 64
    queue = domain.disks[0].guest_queue
    assert queue is None or queue.discard_max_bytes is None or queue.discard_max_bytes >= 0


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60))
def test_a_hostile_unit_gives_a_printable_command(tail: str) -> None:
    unit = f"[Service]\nExecStart=/sbin/fstrim --all \x1b[2J{tail}\n"
    out = f"vmtrim-enabled 0\nvmtrim-file /etc/systemd/system/fstrim.service\n{unit}"
    facts = parse_timer(out.encode("utf-8", "surrogatepass"), 0)
    assert facts.enabled and facts.command is not None and facts.command.isprintable()
    assert facts.command.startswith("/sbin/fstrim --all ?[2J")


class SlowQueueAgent(HostileAgent):
    """Plumbing: answers everything, but the sysfs read runs out of time."""

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus:
        if "vmtrim-queue" in " ".join(args):
            raise AgentUnavailable("guest pid 7 did not exit in time", subject="g")
        return ExecStatus(exited=True, exitcode=0, out_data=b"/dev/vda / ext4 rw,discard 0 0\n")


def test_a_queue_read_out_of_time_keeps_the_other_facts() -> None:
    domain: Domain = parse_domain_xml(XML)
    guest_facts(SlowQueueAgent({"kernel-release": "6.1.0"}, "vda", "/dev/vda", b""), domain, XML, 5)
    [fs] = domain.disks[0].guest_filesystems or []
    assert (fs.mountpoint, fs.mount_options) == ("/", ("rw", "discard"))
    assert domain.disks[0].guest_queue is None
    assert any("sysfs queues are unknown" in n for n in domain.notes)
