"""Connection plumbing against libvirt's built-in test driver (``test:///default``).

The test driver is for plumbing only (URI choice, lookup, one-line errors, exit
codes); the real proofs are in test_trim_libvirt.py against the real libvirtd.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import vmtrim
from vmtrim.channels.libvirt import connection, is_local_uri, select_domains
from vmtrim.cli import run
from vmtrim.errors import BadInput, EnvironmentProblem

TEST_URI = "test:///default"
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's built-in domain


@pytest.mark.parametrize("spec", ["test", TEST_UUID, TEST_UUID.replace("-", ""), "1"])
def test_domain_by_name_uuid_or_id(spec: str) -> None:
    with connection(TEST_URI) as conn:
        [dom] = select_domains(conn, [spec], every=False)
        assert dom.name() == "test"


def test_all_and_dedup() -> None:
    with connection(TEST_URI) as conn:
        assert [d.name() for d in select_domains(conn, [], every=True)] == ["test"]
        assert len(select_domains(conn, ["test", TEST_UUID, "1"], every=False)) == 1
        with pytest.raises(BadInput):
            select_domains(conn, ["test"], every=True)
        with pytest.raises(BadInput):
            select_domains(conn, [], every=False)


def test_unknown_domain_is_bad_input() -> None:
    with connection(TEST_URI) as conn, pytest.raises(BadInput) as info:
        select_domains(conn, ["nosuchdomain"], every=False)
    assert info.value.one_line() == "nosuchdomain: no such domain on test:///default"


def test_uri_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", TEST_URI)
    with connection(None) as conn:
        assert conn.uri == TEST_URI
        hv, lib = conn.versions()
        assert (hv, lib) == (None, "9.0.0")  # the test driver is not QEMU


def test_bad_uri_is_environment_error() -> None:
    with pytest.raises(EnvironmentProblem) as info:
        connection("bogus:///nowhere").__enter__()
    assert info.value.subject == "bogus:///nowhere"


def test_cli_connection_error_one_line_exit_3() -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/sock"
    result = vmtrim("trim", "-c", uri, "x")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vmtrim: {uri}: cannot connect")


def test_cli_unknown_domain_exit_2() -> None:
    result = vmtrim("trim", "-c", TEST_URI, "nosuchdomain")
    assert result.returncode == 2
    assert result.stderr == "vmtrim: nosuchdomain: no such domain on test:///default\n"


def test_cli_without_libvirt_python_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['libvirt'] = None; from vmtrim.cli import main; "
        "main(['trim', '-c', 'test:///default', 'test'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 3
    assert result.stderr == (
        "vmtrim: libvirt-python: install vmtrim[libvirt] (pip install 'vmtrim[libvirt]')\n"
    )


def test_cli_trim_test_driver_reports_failure_not_crash(capsys: pytest.CaptureFixture[str]) -> None:
    # The test driver has no guest agent: the run completes, the domain fails with a reason.
    code = run(["trim", "-c", TEST_URI, "--all", "--json", "--timeout", "5"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["schema"] == "vmtrim.trim/1"
    [dom] = doc["domains"]
    assert dom["domain"] == "test"
    assert dom["status"] in ("failed", "skipped")
    assert dom["reason"]
    [disk] = dom["disks"]
    assert disk["target"] == "vda" and disk["source"] == "/guest/diskimage1"


def test_locality() -> None:
    assert is_local_uri("qemu:///system") and is_local_uri("qemu+unix:///system")
    assert not is_local_uri("qemu+ssh://root@host/system")


NODE = """<node>
  <domain type='test'>
    <name>web</name><memory>1024</memory><os><type>hvm</type></os>
    <devices><disk type='file' device='disk'><source file='/guest/web.img'/>
      <target dev='vda'/></disk></devices>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>old</name><memory>1024</memory><os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"""


def test_all_selects_running_domains_and_a_named_shut_off_one_is_skipped(tmp_path: Path) -> None:
    """One rule (trim --help): --all is the running domains; exit 0 only if all were trimmed."""
    node = tmp_path / "node.xml"
    node.write_text(NODE)  # a test-driver host: "web" running, "old" shut off
    uri = f"test://{node}"
    every = vmtrim("trim", "-c", uri, "--all", "--json", "--timeout", "5")
    doc = json.loads(every.stdout)
    assert [d["domain"] for d in doc["domains"]] == ["web"]
    assert doc["not_running"] == ["old"]
    # web answers no agent command (the test driver has none): failed, so exit 1.
    assert (doc["domains"][0]["status"], every.returncode) == ("failed", 1)
    human = vmtrim("trim", "-c", uri, "--all", "--timeout", "5")
    assert not any(line.startswith("old ") for line in human.stdout.splitlines())
    assert "1 shut-off domain(s) not trimmed (--all trims running domains): old" in human.stdout
    named = vmtrim("trim", "-c", uri, "old", "--json")
    [dom] = json.loads(named.stdout)["domains"]
    assert (dom["status"], dom["reason"], named.returncode) == (
        "skipped",
        "the domain is not running",
        1,
    )


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        (["trimmed", "trimmed"], 0),
        (["trimmed", "no_effect"], 1),
        (["trimmed", "skipped"], 1),
        (["failed"], 1),
        ([], 0),  # --all on a host with nothing running: nothing to do is not a finding
    ],
)
def test_exit_code_rule(statuses: list[str], code: int) -> None:
    from vmtrim.cli.trim import exit_code
    from vmtrim.trim.engine import TrimResult

    assert exit_code([TrimResult(f"d{i}", status=s) for i, s in enumerate(statuses)]) == code
