"""The byte-preserving XML editor under vmtrim fix (vmtrim.fix.xmledit)."""

from __future__ import annotations

import difflib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from vmtrim.errors import BadInput
from vmtrim.fix.xmledit import XmlEditor

DOC = """<?xml version='1.0' encoding='UTF-8'?>
<!-- written by hand -->
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>a&amp;b</name>
  <devices>
    <disk type='file' device='disk'>
      <!-- keep me -->
      <source file='/tmp/a.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type="file"   device="disk"><driver name="qemu"  /><source file="/b"/></disk>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-set'/>
    <qemu:arg value="device.x.y=&quot;z&quot;"/>
  </qemu:commandline>
</domain>
"""


def find(element: etree._Element, path: str) -> etree._Element:
    """``element.find(path)``, which the test's document is known to have."""
    found = element.find(path)
    assert found is not None, path
    return found


def changed_lines(old: str, new: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def test_edits_touch_only_their_lines() -> None:
    editor = XmlEditor(DOC)
    first, second = editor.root.findall("devices/disk")
    editor.insert_child(
        first, etree.Element("driver", name="qemu", discard="unmap"), before=first.find("source")
    )
    editor.set_attribute(find(first, "target"), "dev", "sda")
    editor.remove(find(first, "address"))
    address = etree.Element("address", type="drive", controller="0", bus="0", target="0", unit="0")
    editor.insert_child(first, address, after=first.find("target"))
    editor.set_attribute(find(second, "driver"), "discard", "unmap")
    editor.prepend_attributes(find(second, "driver"), [("type", "raw")])
    editor.insert_child(find(editor.root, "devices"), etree.Element("controller", type="scsi"))
    editor.check()
    assert changed_lines(DOC, editor.text()) == [
        "+      <driver name='qemu' discard='unmap'/>",
        "-      <target dev='vda' bus='virtio'/>",
        "-      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>",
        "+      <target dev='sda' bus='virtio'/>",
        "+      <address type='drive' controller='0' bus='0' target='0' unit='0'/>",
        '-    <disk type="file"   device="disk"><driver name="qemu"  /><source file="/b"/></disk>',
        '+    <disk type="file"   device="disk"><driver type="raw" name="qemu" discard="unmap"  />'
        '<source file="/b"/></disk>',
        "+    <controller type='scsi'/>",
    ]


def test_no_edit_is_identity() -> None:
    editor = XmlEditor(DOC)
    assert not editor.changed
    assert editor.text() == DOC


@pytest.mark.parametrize(
    "text",
    ["<domain>", "not xml", "<a><b></a>", "", "<a>&undefined;</a>", "<a x='1' x='2'/>"],
)
def test_bad_xml_is_bad_input(text: str) -> None:
    with pytest.raises(BadInput):
        XmlEditor(text, subject="t.xml")


def test_entities_stay_unexpanded() -> None:
    text = "<!DOCTYPE a [<!ENTITY e '<b/>'>]><a>&e;<c/></a>"
    editor = XmlEditor(text)
    editor.set_attribute(find(editor.root, "c"), "x", "1")
    editor.check()
    assert editor.text() == "<!DOCTYPE a [<!ENTITY e '<b/>'>]><a>&e;<c x='1'/></a>"


def test_insert_into_empty_parents() -> None:
    for text, expected in [
        ("<domain><devices/></domain>", "<domain><devices><controller/></devices></domain>"),
        (
            "<domain>\n  <devices>\n  </devices>\n</domain>",
            "<domain>\n  <devices>\n    <controller/>\n  </devices>\n</domain>",
        ),
        (
            "<domain>\n  <devices/>\n</domain>",
            "<domain>\n  <devices>\n    <controller/>\n  </devices>\n</domain>",
        ),
    ]:
        editor = XmlEditor(text)
        editor.insert_child(find(editor.root, "devices"), etree.Element("controller"))
        editor.check()
        assert editor.text() == expected


# -- property: any edits on any indented document keep text and tree in step ------------

names = st.sampled_from(["disk", "driver", "target", "address", "x", "qemu:arg"])
values = st.text(alphabet="ab<&'\" 0", max_size=4)


@st.composite
def documents(draw: st.DrawFn) -> str:
    quote = draw(st.sampled_from(["'", '"']))

    def element(depth: int) -> str:
        name = draw(names)
        attrs = draw(st.lists(st.sampled_from(["a", "b", "dev"]), unique=True, max_size=2))
        space = draw(st.sampled_from(["", " ", "  "]))
        attr_text = "".join(f" {a}={quote}v{quote}" for a in attrs)
        pad = "\n" + "  " * (depth + 1)
        kids = [] if depth > 2 else draw(st.lists(st.just(0), max_size=3))
        if not kids:
            return f"<{name}{attr_text}{space}/>"
        inner = "".join(
            pad + (draw(st.sampled_from(["", "<!-- c -->" + pad]))) + element(depth + 1)
            for _ in kids
        )
        return f"<{name}{attr_text}>{inner}\n{'  ' * depth}</{name}>"

    ns = "xmlns:qemu='urn:q'"
    body = element(1)
    return f"<domain {ns}>\n  {body}\n</domain>\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.data())
def test_random_edits_keep_text_and_tree_in_step(text: str, data: st.DataObject) -> None:
    editor = XmlEditor(text)
    elements = [e for e in editor.root.iter() if isinstance(e.tag, str) and e is not editor.root]
    touched: set[int] = set()  # edited elements and their ancestors: never removed later
    for element in data.draw(st.lists(st.sampled_from(elements), max_size=4, unique_by=id)):
        attached = any(a is editor.root for a in element.iterancestors())
        if not attached or any(id(d) in touched for d in element.iter()):
            continue  # already removed with an ancestor, or edited: leave it
        action = data.draw(
            st.sampled_from(["set", "prepend", "after", "before", "remove", "unset"])
        )
        touched |= {id(element), *(id(a) for a in element.iterancestors())}
        if action == "set":
            editor.set_attribute(element, data.draw(st.sampled_from(["a", "z"])), data.draw(values))
        elif action == "prepend" and "p" not in element.attrib:
            editor.prepend_attributes(element, [("p", data.draw(values))])
        elif action in ("after", "before"):
            parent = element.getparent()
            assert parent is not None
            new = etree.Element("new", n=data.draw(values))
            kwargs = {action: element}
            editor.insert_child(parent, new, **kwargs)
        elif action == "remove":
            editor.remove(element)
        elif action == "unset" and element.attrib:
            editor.remove_attribute(element, str(next(iter(element.attrib))))
    editor.check()
    again = XmlEditor(editor.text())
    assert again.text() == editor.text()
