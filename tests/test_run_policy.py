"""The run policy: defaults, sizes and durations, and one stderr line for every bad file."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import time as clock
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmtrim.errors import BadInput
from vmtrim.run.engine import spread_offset
from vmtrim.run.policy import (
    DEFAULT_URI,
    MiB,
    Policy,
    Window,
    load_policy,
    parse_duration,
    parse_policy,
    parse_size,
)


def vmtrim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmtrim", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_an_empty_policy_is_every_default() -> None:
    policy = parse_policy("")
    assert policy.connect == (DEFAULT_URI,)
    assert (policy.include, policy.exclude) == (("*",), ())
    assert (policy.minimum, policy.parallel, policy.timeout) == (MiB, 2, 120.0)
    assert policy.timeout_windows > policy.timeout
    assert (policy.spread, policy.window, policy.skip_if_blocked) == (0.0, None, True)
    assert (policy.settle, policy.textfile) == (30.0, None)


def test_every_key_is_read() -> None:
    policy = parse_policy(
        """
connect = ["qemu:///system", "qemu+ssh://kvm2/system"]
include = ["web-*", "db[0-9]"]
exclude = ["*-test"]
minimum = "64KiB"
parallel = 4
timeout = "3m"
spread = "1h"
window = "22:00-04:00"
skip_if_blocked = false
settle = 5
textfile = "/var/lib/node-exporter/vmtrim.prom"
"""
    )
    assert policy.connect == ("qemu:///system", "qemu+ssh://kvm2/system")
    assert (policy.minimum, policy.parallel, policy.timeout, policy.spread) == (
        64 * 1024,
        4,
        180.0,
        3600.0,
    )
    assert policy.timeout_windows >= 180.0
    assert policy.window == Window(clock(22, 0), clock(4, 0))
    assert policy.selects("web-1") and policy.selects("db7")
    assert not policy.selects("web-test") and not policy.selects("mail")
    assert policy.textfile == "/var/lib/node-exporter/vmtrim.prom"
    assert policy.skip_if_blocked is False


def test_the_hash_follows_what_the_policy_says() -> None:
    assert parse_policy("").hash == Policy().hash
    assert parse_policy("parallel = 2").hash == Policy().hash  # the default, spelt out
    assert parse_policy("parallel = 3").hash != Policy().hash


@pytest.mark.parametrize(
    ("text", "line", "key", "why"),
    [
        ("parallel = 2\nparalel = 3\n", 2, "paralel", "unknown key"),
        ("# a comment\n\nparallel = 'two'\n", 3, "parallel", "must be an integer"),
        ("parallel = true\n", 1, "parallel", "must be an integer"),
        ("include = 'web-*'\n", 1, "include", "must be an array"),
        ("exclude = ['ok', 'web-[12']\n", 1, "exclude", "unclosed '['"),
        ("include = ['']\n", 1, "include", "empty glob"),
        ("minimum = '1 parsec'\n", 1, "minimum", "not a size"),
        ("minimum = -1\n", 1, "minimum", "negative"),
        ("timeout = 0\n", 1, "timeout", "more than 0"),
        ("spread = '1 fortnight'\n", 1, "spread", "not a duration"),
        ("window = '25:00-04:00'\n", 1, "window", "not a time of day"),
        ("window = '01:00-01:00'\n", 1, "window", "empty window"),
        ("window = 1\n", 1, "window", "must be a string"),
        ("skip_if_blocked = 'yes'\n", 1, "skip_if_blocked", "true or false"),
        ("connect = []\n", 1, "connect", "at least one"),
        ("parallel = 2\n[domains]\nweb = 1\n", 2, "domains", "unknown key"),
    ],
)
def test_a_bad_key_names_file_line_and_key(text: str, line: int, key: str, why: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_policy(text, "/etc/vmtrim/policy.toml")
    assert err.value.subject == f"/etc/vmtrim/policy.toml:{line}"
    assert err.value.message.startswith(f"{key}: ")
    assert why in err.value.message


def test_bad_toml_names_its_line() -> None:
    with pytest.raises(BadInput) as err:
        parse_policy("parallel = 2\nwindow = '01:00\n", "p.toml")
    assert err.value.subject == "p.toml:2"


def test_sizes_and_durations() -> None:
    assert [parse_size(s) for s in ("0", "512", "64k", "1MiB", "1MB", "2G")] == [
        0,
        512,
        65536,
        MiB,
        1000000,
        2 * 1024**3,
    ]
    assert [parse_duration(s) for s in ("30", "90s", "10m", "1h", "30d")] == [
        30,
        90,
        600,
        3600,
        30 * 86400,
    ]


def test_windows_cross_midnight() -> None:
    night = Window.parse("22:00-04:00")
    assert night.contains(clock(23, 30)) and night.contains(clock(3, 59))
    assert not night.contains(clock(4, 0)) and not night.contains(clock(12, 0))
    day = Window.parse("01:00-05:00")
    assert day.contains(clock(1, 0)) and not day.contains(clock(5, 0))
    assert str(Window.parse("1:05-24:00")) == "01:05-00:00"


def test_spread_is_stable_and_inside_the_spread() -> None:
    offsets = [spread_offset("kvm1", f"vm{i}", 3600) for i in range(200)]
    assert offsets == [spread_offset("kvm1", f"vm{i}", 3600) for i in range(200)]
    assert all(0 <= o < 3600 for o in offsets)
    assert len({round(o) for o in offsets}) > 150  # spread out, not bunched
    # Another host orders the same names differently: two hosts do not trim in step.
    assert offsets != [spread_offset("kvm2", f"vm{i}", 3600) for i in range(200)]


def test_a_missing_default_file_is_every_default(tmp_path: Path) -> None:
    assert load_policy(None).hash == Policy().hash or Path("/etc/vmtrim/policy.toml").exists()
    with pytest.raises(BadInput, match="no such policy file"):
        load_policy(tmp_path / "nope.toml")


def test_cli_a_bad_policy_is_one_line_exit_2_before_anything_runs(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('connect = ["qemu:///nowhere-at-all"]\n\nparallel = "two"\n')
    db = tmp_path / "history.db"
    result = vmtrim("run", "--policy", str(policy), "--db", str(db), "--lock", str(tmp_path / "l"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"vmtrim: {policy}:3: parallel: must be an integer, not a string"
    ]
    assert result.stdout == ""
    assert not db.exists() and not (tmp_path / "l").exists()  # nothing ran


def test_cli_outside_the_window_trims_nothing_and_says_so(tmp_path: Path) -> None:
    from datetime import datetime, timedelta

    later = datetime.now() + timedelta(hours=2)
    window = f"{later:%H}:00-{(later + timedelta(hours=1)):%H}:00"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'window = "{window}"\ninclude = ["nothing-matches-*"]\n')
    db = tmp_path / "history.db"
    result = vmtrim("run", "--policy", str(policy), "--db", str(db), "--lock", str(tmp_path / "l"))
    assert result.returncode == 0, result.stderr
    assert f"outside the maintenance window {window}" in result.stdout
    assert "nothing trimmed" in result.stdout
    assert not db.exists()


def test_default_paths_for_root_and_for_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interpreter here lives where nobody cannot read, so the user case is the path rule.
    from vmtrim.history.store import default_db_path
    from vmtrim.run.lock import default_lock_path
    from vmtrim.run.policy import default_policy_path

    monkeypatch.delenv("VMTRIM_HISTORY_DB", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_policy_path() == Path("/etc/vmtrim/policy.toml")
    assert default_db_path() == Path("/var/lib/vmtrim/history.db")
    assert default_lock_path() == Path("/run/vmtrim/run.lock")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert default_policy_path() == tmp_path / "config" / "vmtrim" / "policy.toml"
    assert default_db_path() == tmp_path / "state" / "vmtrim" / "history.db"
    assert default_lock_path() == tmp_path / "run" / "vmtrim" / "run.lock"


# --- fuzz: whatever the file says, the parser returns a Policy or raises BadInput ----------

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(
    [
        "connect",
        "include",
        "exclude",
        "minimum",
        "parallel",
        "timeout",
        "timeout_windows",
        "spread",
        "window",
        "skip_if_blocked",
        "settle",
        "textfile",
        "bogus",
    ]
)


def _toml_value(value: object) -> str:
    import json

    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, int | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_fuzz_any_values_give_a_policy_or_one_bad_input(data: dict[str, object]) -> None:
    text = "\n".join(f"{key} = {_toml_value(value)}" for key, value in data.items())
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # not TOML at all (e.g. a huge integer): covered by test_bad_toml_names_its_line
    try:
        policy = parse_policy(text, "fuzz.toml")
    except BadInput as exc:
        assert exc.subject is not None and exc.subject.startswith("fuzz.toml:")
        key = exc.message.split(":", 1)[0]
        assert key in data
        line = int(exc.subject.rsplit(":", 1)[1])
        assert text.splitlines()[line - 1].startswith(key)
        return
    assert policy.parallel >= 1 and policy.timeout > 0 and policy.minimum >= 0
    assert set(data) <= set(policy.to_json())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_any_text_gives_a_policy_or_one_bad_input(text: str) -> None:
    try:
        parse_policy(text, "fuzz.toml")
    except BadInput as exc:
        assert exc.subject is not None and exc.subject.startswith("fuzz.toml")
