"""The shared model: verdict ordering, versions, machine types, JSON shape."""

from __future__ import annotations

from vmtrim._util.versions import parse_version
from vmtrim.model import (
    BlockNode,
    Disk,
    DiskReport,
    Finding,
    Layer,
    LayerKind,
    MachineType,
    Severity,
    Verdict,
)


def test_worst_verdict_wins() -> None:
    assert Verdict.worst([]) is Verdict.PASS
    assert Verdict.worst([Verdict.PASS, Verdict.UNKNOWN]) is Verdict.UNKNOWN
    assert Verdict.worst([Verdict.BLOCK, Verdict.UNKNOWN, Verdict.PASS]) is Verdict.BLOCK


def test_versions_and_machine_types() -> None:
    assert parse_version("5.10.0-26-cloud-amd64") == (5, 10, 0)
    assert parse_version("garbage") is None
    assert MachineType.parse("pc-i440fx-3.1").version == (3, 1)
    assert MachineType.parse("pc-q35-7.2").family == "pc-q35"
    assert MachineType.parse("pc").version is None


def test_file_chain_stops_on_cycles() -> None:
    top = BlockNode("qcow2", node_name="f")
    top.file = BlockNode("file", node_name="s", filename="/x")
    top.file.file = top  # a malformed input must not loop forever
    assert [n.node_name for n in top.file_chain()] == ["f", "s"]
    assert top.protocol.node_name == "s"


def test_report_json_has_required_fields() -> None:
    disk = Disk(domain="d", ident="drive0", source="/x", discard=None)
    report = DiskReport(
        disk,
        [
            Layer(LayerKind.GUEST_FS, Verdict.UNKNOWN, "no guest facts"),
            Layer(LayerKind.BLOCK_NODE, Verdict.BLOCK, "discard not set", "add discard"),
        ],
        [
            Finding(Severity.INFO, LayerKind.HOST_STORAGE, "ls size never shrinks"),
            Finding(Severity.BLOCK, LayerKind.BLOCK_NODE, "discard ignored", "add discard"),
        ],
    )
    doc = report.to_json()
    for key in (
        "domain",
        "target",
        "device",
        "bus",
        "source",
        "format",
        "discard",
        "verdict",
        "layers",
        "findings",
    ):
        assert key in doc
    assert doc["target"] == "drive0"
    assert doc["verdict"] == "block" and report.blocks
    assert doc["findings"][0]["severity"] == "block"
    assert set(doc["layers"][0]) == {"layer", "verdict", "reason", "fix"}
