"""The run policy: a small TOML file read with :mod:`tomllib`, every key with a default.

::

    connect = ["qemu:///system"]   # libvirt URIs
    include = ["*"]                # domain-name globs (fnmatch)
    exclude = []
    minimum = "1MiB"               # guest-fstrim minimum extent: bytes or a size string
    parallel = 2                   # domains at once per host
    timeout = 120                  # seconds per domain (a number or "2m")
    timeout_windows = 600          # for guests whose guest-get-osinfo says Windows
    spread = 0                     # spread the domains over this many seconds
    window = "01:00-05:00"         # optional maintenance window, host local time
    skip_if_blocked = true         # do not trim a disk path audit finds blocked
    settle = 30                    # vmtrim watch: seconds after an event before the trim
    textfile = "/var/lib/prometheus/node-exporter/vmtrim.prom"   # metrics, optional

A key that is unknown, of the wrong type, or a glob or window that does not parse is a
:class:`~vmtrim.errors.BadInput` whose subject is ``FILE:LINE`` and whose message names
the key, raised before anything runs. tomllib gives no line for a key, so the line
is found in the text (the first line that assigns the key or opens its table).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import time as clock
from pathlib import Path
from typing import Any

from vmtrim.errors import BadInput

MiB = 1024 * 1024
DEFAULT_URI = "qemu:///system"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MiB,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


def parse_size(text: str) -> int:
    """'1MiB' -> 1048576; '64k' -> 65536; '1MB' -> 1000000. ValueError otherwise."""
    match = _NUMBER_UNIT.fullmatch(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes, or e.g. 64KiB, 1MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str) -> float:
    """'30' or '30s' -> 30; '10m' -> 600; '1h' -> 3600; '30d' -> 2592000."""
    match = _NUMBER_UNIT.fullmatch(text)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use seconds, or e.g. 90s, 10m, 1h, 30d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class Window:
    """A daily maintenance window in host local time; may cross midnight (22:00-04:00)."""

    start: clock
    end: clock

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.fullmatch(text)
        if not match:
            raise ValueError(f"not a window: {text!r} (use HH:MM-HH:MM, e.g. 01:00-05:00)")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"not a time of day in {text!r}")
        start, end = clock(h1, m1), clock(0, 0) if h2 == 24 else clock(h2, m2)
        if start == end:
            raise ValueError(f"an empty window: {text!r}")
        return cls(start, end)

    def contains(self, now: clock) -> bool:
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # across midnight

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class Policy:
    connect: tuple[str, ...] = (DEFAULT_URI,)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    minimum: int = MiB
    parallel: int = 2
    timeout: float = 120.0
    timeout_windows: float = 600.0
    spread: float = 0.0
    window: Window | None = None
    skip_if_blocked: bool = True
    settle: float = 30.0
    textfile: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it came from

    def selects(self, name: str) -> bool:
        from fnmatch import fnmatchcase

        return any(fnmatchcase(name, g) for g in self.include) and not any(
            fnmatchcase(name, g) for g in self.exclude
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("source")
        doc["window"] = str(self.window) if self.window else None
        for key in ("connect", "include", "exclude"):
            doc[key] = list(doc[key])
        return doc

    @property
    def hash(self) -> str:
        """A stable id of what the policy says (defaults included), for the history."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_policy_path() -> Path:
    """/etc/vmtrim/policy.toml for root, $XDG_CONFIG_HOME/vmtrim/policy.toml otherwise."""
    if os.geteuid() == 0:
        return Path("/etc/vmtrim/policy.toml")
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "vmtrim" / "policy.toml"


def load_policy(path: str | os.PathLike[str] | None) -> Policy:
    """The policy in ``path``; with None the default file, or all defaults if it is absent."""
    where = Path(path) if path is not None else default_policy_path()
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path is None:
            return Policy()
        raise BadInput("no such policy file", subject=str(where)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the policy: {exc}", subject=str(where)) from exc
    return parse_policy(text, str(where))


def parse_policy(text: str, name: str = "policy.toml") -> Policy:
    """Parse and check a policy; BadInput with subject ``name:LINE`` on the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"at line (\d+)", str(exc))
        number = line.group(1) if line else len(text.splitlines()) or 1  # "at end of document"
        where = f"{name}:{number}"
        raise BadInput(f"not valid TOML: {exc}", subject=where) from exc
    values: dict[str, Any] = {}
    for key, value in data.items():
        check = _CHECKS.get(key)
        if check is None:
            known = ", ".join(sorted(_CHECKS))
            raise _bad(text, name, key, f"unknown key (known: {known})")
        try:
            values[key] = check(value)
        except ValueError as exc:
            raise _bad(text, name, key, str(exc)) from None
    if "timeout" in values and "timeout_windows" not in values:
        values["timeout_windows"] = max(Policy.timeout_windows, values["timeout"])
    return Policy(**values, source=name)


def _bad(text: str, name: str, key: str, why: str) -> BadInput:
    return BadInput(f"{key}: {why}", subject=f"{name}:{key_line(text, key)}")


def key_line(text: str, key: str) -> int:
    """The first line that assigns top-level ``key`` or opens its table; 1 if none does."""
    quoted = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    assign = re.compile(rf"^\s*{quoted}\s*[=.]")
    table = re.compile(rf"^\s*\[\[?\s*{quoted}\s*[\].]")
    for number, line in enumerate(text.splitlines(), 1):
        if assign.match(line) or table.match(line):
            return number
    return 1


# --- one checker per key: value from tomllib -> the Policy field, or ValueError ----------


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be an array of {what}, not {_type_name(value)}")
    return tuple(value)


def _uris(value: object) -> tuple[str, ...]:
    uris = (value,) if isinstance(value, str) else _strings(value, "libvirt URIs")
    if not uris or any(not u.strip() for u in uris):
        raise ValueError("must name at least one libvirt URI, and none empty")
    return uris


def check_glob(glob: str) -> str:
    """A domain-name glob: not empty, no control characters, every '[' closed."""
    if not glob:
        raise ValueError("an empty glob matches nothing")
    if any(ord(c) < 32 or ord(c) == 127 for c in glob):
        raise ValueError(f"glob {glob!r} has a control character")
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            # fnmatch's own rule: '!' negates, a ']' first is literal. It treats an
            # unclosed '[' as a literal character, which is almost always a typo.
            j = i + 1
            j += glob[j : j + 1] == "!"
            j += glob[j : j + 1] == "]"
            end = glob.find("]", j)
            if end < 0:
                raise ValueError(f"glob {glob!r} has an unclosed '['")
            i = end
        i += 1
    return glob


def _globs(value: object) -> tuple[str, ...]:
    return tuple(check_glob(g) for g in _strings(value, "domain-name globs"))


def _number(value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of seconds, not {_type_name(value)}")
    seconds = parse_duration(value) if isinstance(value, str) else float(value)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number of seconds")
    if seconds < 0 or (positive and seconds == 0):
        raise ValueError(f"must be {'more than' if positive else 'at least'} 0 seconds")
    return seconds


def _minimum(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        what = _type_name(value)
        raise ValueError(f"must be bytes (an integer) or a size like '1MiB', not {what}")
    size = parse_size(value) if isinstance(value, str) else value
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _parallel(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {_type_name(value)}")
    if not 1 <= value <= 256:
        raise ValueError("must be between 1 and 256")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_type_name(value)}")
    return value


def _window(value: object) -> Window:
    if not isinstance(value, str):
        raise ValueError(f"must be a string like '01:00-05:00', not {_type_name(value)}")
    return Window.parse(value)


def _path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a file path, not {_type_name(value)}")
    return value


_CHECKS: dict[str, Any] = {
    "connect": _uris,
    "include": _globs,
    "exclude": _globs,
    "minimum": _minimum,
    "parallel": _parallel,
    "timeout": lambda v: _number(v, positive=True),
    "timeout_windows": lambda v: _number(v, positive=True),
    "spread": lambda v: _number(v, positive=False),
    "window": _window,
    "skip_if_blocked": _bool,
    "settle": lambda v: _number(v, positive=False),
    "textfile": _path,
}
