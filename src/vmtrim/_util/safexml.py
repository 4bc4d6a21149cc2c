"""The one safe XML parser configuration, for every XML vmtrim reads.

libvirt XML comes from users and from other hosts: entities are never resolved, nothing
is fetched from the network, no DTD is loaded and huge trees are refused, so XXE,
parameter entities, XInclude and billion-laughs documents cannot reach further than the
text itself.
"""

from __future__ import annotations

import re

from lxml import etree

from vmtrim.errors import BadInput


def xml_parser() -> etree.XMLParser:
    """The one safe parser configuration: no entities, no network, no DTD, blank text kept."""
    return etree.XMLParser(
        remove_blank_text=False,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=False,
        remove_pis=False,
        strip_cdata=False,
    )


def parse(text: str, subject: str | None = None) -> etree._ElementTree:
    """Parse ``text`` with :func:`xml_parser`; malformed XML is :class:`BadInput`."""
    try:
        root = etree.fromstring(_strip_declaration(text).encode("utf-8"), xml_parser())
    except etree.XMLSyntaxError as exc:
        raise BadInput(f"malformed XML: {exc}", subject=subject) from exc
    return root.getroottree()


def _strip_declaration(text: str) -> str:
    # The text is already decoded; an encoding="..." in the declaration would make
    # libxml2 decode the UTF-8 bytes a second time. Keep the length so offsets hold.
    match = re.match(r"\s*<\?xml\s[^?]*\?>", text)
    if not match:
        return text
    return " " * len(match.group(0)) + text[match.end() :]
