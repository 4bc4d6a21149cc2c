"""Edit an XML document in place, keeping every byte that is not edited.

lxml is the tree of truth: it parses (entities unresolved, no network, blank text
kept), answers queries, and receives every edit. But lxml's serializer cannot give
the user's file back unchanged: it turns ``name='qemu'`` (how ``virsh dumpxml``
quotes) into ``name="qemu"`` and drops whitespace inside tags. So each edit is also
recorded as a splice of the original text, and :meth:`XmlEditor.text` applies the
splices. :meth:`XmlEditor.check` proves the two agree by comparing the canonical
(lxml-serialized) form of the edited lxml tree with that of the spliced text, re-parsed.

To know where an element is in the text, a small lexer walks the (already
well-formed, lxml accepted it) text and pairs the n-th start tag with the n-th
element of the tree in document order.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass

from lxml import etree

from vmtrim._util.safexml import parse
from vmtrim.errors import BadInput

_NAME_END = re.compile(r"[\s/>]")
_ATTRIBUTE = re.compile(r"""\s+([^\s=/>]+)\s*=\s*("[^"]*"|'[^']*')""")


@dataclass
class _Tag:
    """A start tag in the text: [start, end) of the tag, and of the whole element."""

    name: str
    start: int
    end: int
    self_closing: bool
    element_end: int = -1
    close_start: int = -1  # where the end tag starts (== element_end when self-closing)


def _lex(text: str) -> Iterator[tuple[str, int, int, str]]:
    """Yield (kind, start, end, name) for 'start', 'empty' and 'end' tags, in order."""
    pos = 0
    length = len(text)
    while True:
        lt = text.find("<", pos)
        if lt < 0:
            return
        if text.startswith("<!--", lt):
            pos = _after(text, "-->", lt + 4)
        elif text.startswith("<![CDATA[", lt):
            pos = _after(text, "]]>", lt + 9)
        elif text.startswith("<?", lt):
            pos = _after(text, "?>", lt + 2)
        elif text.startswith("<!", lt):
            pos = _skip_declaration(text, lt + 2)
        elif text.startswith("</", lt):
            gt = _after(text, ">", lt + 2)
            yield "end", lt, gt, text[lt + 2 : gt - 1].strip()
            pos = gt
        else:
            match = _NAME_END.search(text, lt + 1)
            name_end = match.start() if match else length
            i = name_end
            while i < length and text[i] != ">":
                if text[i] in "\"'":
                    i = _after(text, text[i], i + 1) - 1
                i += 1
            gt = i + 1
            kind = "empty" if text[i - 1] == "/" else "start"
            yield kind, lt, gt, text[lt + 1 : name_end]
            pos = gt


def _after(text: str, needle: str, pos: int) -> int:
    found = text.find(needle, pos)
    if found < 0:
        raise ValueError("unterminated markup")
    return found + len(needle)


def _skip_declaration(text: str, pos: int) -> int:
    # <!DOCTYPE ... [ internal subset ] > : brackets and quotes may hide '>'.
    depth = 0
    while pos < len(text):
        char = text[pos]
        if char in "\"'":
            pos = _after(text, char, pos + 1)
            continue
        if text.startswith("<!--", pos):
            pos = _after(text, "-->", pos + 4)
            continue
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == ">" and depth <= 0:
            return pos + 1
        pos += 1
    raise ValueError("unterminated declaration")


def _local(qname: str) -> str:
    return qname.rsplit(":", 1)[-1]


def _escape_attribute(value: str, quote: str) -> str:
    value = value.replace("&", "&amp;").replace("<", "&lt;")
    return value.replace(quote, "&quot;" if quote == '"' else "&apos;")


class XmlEditor:
    """An lxml tree plus the original text; edits go to both."""

    def __init__(self, text: str, subject: str | None = None) -> None:
        self.original = text
        self.subject = subject
        self.tree = parse(text, subject)
        self.root: etree._Element = self.tree.getroot()
        self._tags: dict[etree._Element, _Tag] = {}
        self._splices: list[tuple[int, int, str, int]] = []  # (start, end, new, sequence)
        self._spans: list[tuple[int, int]] = []  # the same (start, end), sorted: overlap checks
        self._after_last: dict[etree._Element, etree._Element] = {}  # anchor -> last insert
        self._map_tags()

    # -- positions -----------------------------------------------------------------

    def _map_tags(self) -> None:
        elements = [el for el in self.root.iter() if isinstance(el.tag, str)]
        stack: list[_Tag] = []
        tags: list[_Tag] = []
        try:
            for kind, start, end, name in _lex(self.original):
                if kind == "end":
                    tag = stack.pop()
                    tag.element_end = end
                    tag.close_start = start
                    continue
                tag = _Tag(name, start, end, kind == "empty")
                if tag.self_closing:
                    tag.element_end = tag.close_start = end
                else:
                    stack.append(tag)
                tags.append(tag)
        except (ValueError, IndexError) as exc:
            raise BadInput(f"cannot locate XML markup: {exc}", subject=self.subject) from exc
        if len(tags) != len(elements) or stack:
            raise BadInput(
                "XML markup does not match its parse (entities that expand to elements?)",
                subject=self.subject,
            )
        for element, tag in zip(elements, tags, strict=True):
            if _local(tag.name) != etree.QName(element).localname:
                raise BadInput(
                    f"XML markup <{tag.name}> does not match parsed <{element.tag}>",
                    subject=self.subject,
                )
            self._tags[element] = tag

    def _tag(self, element: etree._Element) -> _Tag:
        try:
            return self._tags[element]
        except KeyError:
            raise ValueError(
                "element was created by this editor; edit it before inserting"
            ) from None

    def _splice(self, start: int, end: int, new: str) -> None:
        # Spans never overlap, so only the neighbours in start order can (10,000 disks:
        # a scan of every earlier edit made the fix quadratic).
        at = bisect.bisect_left(self._spans, (start, end))
        for other_start, other_end in self._spans[max(at - 1, 0) : at + 1]:
            if start < other_end and other_start < end:
                raise ValueError("overlapping XML edits")
        self._spans.insert(at, (start, end))
        self._splices.append((start, end, new, len(self._splices)))

    def _line_indent(self, offset: int) -> str | None:
        """The whitespace before ``offset`` on its line, or None if other text precedes it."""
        line_start = self.original.rfind("\n", 0, offset) + 1
        prefix = self.original[line_start:offset]
        return prefix if prefix.strip() == "" else None

    def indent_of(self, element: etree._Element) -> str | None:
        return self._line_indent(self._tag(element).start)

    def child_indent(self, parent: etree._Element) -> str:
        """Indentation for a new child: that of its element children, else parent's + 2."""
        for child in parent:
            if isinstance(child.tag, str) and child in self._tags:
                indent = self.indent_of(child)
                if indent is not None:
                    return indent
        return (self.indent_of(parent) or "") + "  "

    # -- edits ---------------------------------------------------------------------

    def set_attribute(self, element: etree._Element, name: str, value: str) -> None:
        """Set (or add) an attribute; a new one goes after the others, in their quote style."""
        tag = self._tag(element)
        tag_text = self.original[tag.start : tag.end]
        last_end = len(tag.name) + 1
        quote = "'"
        for index, match in enumerate(_ATTRIBUTE.finditer(tag_text)):
            value_text = match.group(2)
            if index == 0:
                quote = value_text[0]
            if match.group(1) == name:
                q = value_text[0]
                self._splice(
                    tag.start + match.start(2) + 1,
                    tag.start + match.end(2) - 1,
                    _escape_attribute(value, q),
                )
                element.set(name, value)
                return
            last_end = match.end()
        at = tag.start + last_end
        self._splice(at, at, f" {name}={quote}{_escape_attribute(value, quote)}{quote}")
        element.set(name, value)

    def remove_attribute(self, element: etree._Element, name: str) -> None:
        """Drop an attribute and the whitespace before it."""
        tag = self._tag(element)
        tag_text = self.original[tag.start : tag.end]
        for match in _ATTRIBUTE.finditer(tag_text):
            if match.group(1) == name:
                self._splice(tag.start + match.start(), tag.start + match.end(), "")
                del element.attrib[name]
                return
        raise KeyError(name)

    def prepend_attributes(
        self, element: etree._Element, attributes: list[tuple[str, str]]
    ) -> None:
        """Add attributes right after the tag name (libvirt's order puts name/type first)."""
        tag = self._tag(element)
        tag_text = self.original[tag.start : tag.end]
        first = _ATTRIBUTE.search(tag_text)
        quote = first.group(2)[0] if first else "'"
        at = tag.start + len(tag.name) + 1
        text = "".join(f" {n}={quote}{_escape_attribute(v, quote)}{quote}" for n, v in attributes)
        self._splice(at, at, text)
        # lxml has no "insert attribute at": rebuild the attribute order to match the text.
        existing = list(element.attrib.items())
        element.attrib.clear()
        for n, v in [*attributes, *existing]:
            element.set(n, v)

    def insert_child(
        self,
        parent: etree._Element,
        new: etree._Element,
        *,
        after: etree._Element | None = None,
        before: etree._Element | None = None,
    ) -> None:
        """Insert ``new`` (a fresh element, no children edited later) into ``parent``.

        It goes after ``after`` or before ``before`` (siblings in ``parent``), or at the
        end; on its own line, indented like its siblings, when they are on their own lines.
        """
        self.insert_children(parent, [new], after=after, before=before)

    def insert_children(
        self,
        parent: etree._Element,
        news: list[etree._Element],
        *,
        after: etree._Element | None = None,
        before: etree._Element | None = None,
    ) -> None:
        """:meth:`insert_child` for several fresh siblings at once, in this order."""
        quote = self._quote_style(parent)
        anchor = after if after is not None else before
        if anchor is None:
            children = [c for c in parent if c in self._tags]
            if not children:
                self._insert_into_empty(parent, news, quote)
                return
            anchor, after = children[-1], children[-1]
        tag = self._tag(anchor)
        separator = "" if self.indent_of(anchor) is None else "\n" + self.child_indent(parent)
        markups = [_markup(new, quote) for new in news]
        if after is not None:
            # Splices at one offset apply in the order made: a later insert after the same
            # anchor goes after the earlier ones, in the tree too.
            last = self._after_last.get(after, after)
            self._splice(tag.element_end, tag.element_end, "".join(separator + m for m in markups))
            tail, last.tail = last.tail, separator or None
            previous = last
            for new in news:
                previous.addnext(new)
                new.tail = separator or None
                previous = new
            news[-1].tail = tail
            self._after_last[after] = news[-1]
        else:
            self._splice(tag.start, tag.start, "".join(m + separator for m in markups))
            for new in news:
                anchor.addprevious(new)
                new.tail = separator or None

    def declare_namespace(self, prefix: str, uri: str) -> None:
        """Declare ``xmlns:prefix`` on the root (where libvirt writes ``xmlns:qemu``), for
        elements of that namespace this editor inserted; nothing when it is declared there."""
        declared = self.root.nsmap.get(prefix)
        if declared not in (None, uri):
            raise BadInput(
                f"the prefix {prefix}: is bound to {declared}, not {uri}", subject=self.subject
            )
        if declared is None:
            tag = self._tag(self.root)
            tag_text = self.original[tag.start : tag.end]
            quote, last_end = "'", len(tag.name) + 1
            for index, match in enumerate(_ATTRIBUTE.finditer(tag_text)):
                if index == 0:
                    quote = match.group(2)[0]
                last_end = match.end()
            at = tag.start + last_end
            value = _escape_attribute(uri, quote)
            self._splice(at, at, f" xmlns:{prefix}={quote}{value}{quote}")
        # lxml cannot add a declaration to an element: let it move the new elements' one
        # up to the root, keeping every other prefix the document declares.
        others = {p for el in self.root.iter() if isinstance(el.tag, str) for p in el.nsmap}
        keep = sorted(p for p in others if p and p != prefix)
        etree.cleanup_namespaces(self.root, top_nsmap={prefix: uri}, keep_ns_prefixes=keep)

    def _insert_into_empty(
        self, parent: etree._Element, news: list[etree._Element], quote: str
    ) -> None:
        tag = self._tag(parent)
        parent_indent = self.indent_of(parent)
        if parent_indent is None:
            before_text, after_text = "", ""
        else:
            before_text, after_text = "\n" + parent_indent + "  ", "\n" + parent_indent
        markup = before_text.join(_markup(new, quote) for new in news)
        if tag.self_closing:
            name = tag.name
            tag_text = self.original[tag.start : tag.end]
            opened = tag_text[:-2].rstrip() + ">"
            self._splice(
                tag.start, tag.end, opened + before_text + markup + after_text + f"</{name}>"
            )
        else:
            if (parent.text or "").strip():
                raise ValueError("cannot insert an element into text content")
            self._splice(tag.end, tag.close_start, before_text + markup + after_text)
        parent.text = before_text or None
        for new in news:
            parent.append(new)
            new.tail = before_text or None
        news[-1].tail = after_text or None

    def remove(self, element: etree._Element) -> None:
        """Remove ``element`` and the whitespace that put it on its own line."""
        tag = self._tag(element)
        start = tag.start
        indent = self.indent_of(element)
        if indent is not None:
            line_start = tag.start - len(indent)
            at_newline = line_start > 0 and self.original[line_start - 1] == "\n"
            start = line_start - 1 if at_newline else line_start
        removed_ws = self.original[start : tag.start]
        self._splice(start, tag.element_end, "")
        previous = element.getprevious()
        parent = element.getparent()
        assert parent is not None
        tail = element.tail or ""
        if previous is not None:
            kept = (previous.tail or "")[: len(previous.tail or "") - len(removed_ws)]
            previous.tail = (kept + tail) or None
        else:
            kept = (parent.text or "")[: len(parent.text or "") - len(removed_ws)]
            parent.text = (kept + tail) or None
        parent.remove(element)

    def _quote_style(self, element: etree._Element) -> str:
        tag = self._tags.get(element)
        if tag is not None:
            match = _ATTRIBUTE.search(self.original[tag.start : tag.end])
            if match:
                return match.group(2)[0]
        for other_tag in self._tags.values():
            match = _ATTRIBUTE.search(self.original[other_tag.start : other_tag.end])
            if match:
                return match.group(2)[0]
        return "'"

    # -- results -------------------------------------------------------------------

    @property
    def changed(self) -> bool:
        return bool(self._splices)

    def edits(self) -> list[tuple[int, int, str]]:
        """The splices of the original text, in order: (start, end, replacement)."""
        ordered = sorted(self._splices, key=lambda s: (s[0], s[1], s[3]))
        return [(start, end, new) for start, end, new, _ in ordered]

    def text(self) -> str:
        # Walk the original once; an insert at an offset comes before a removal starting there.
        pieces: list[str] = []
        cursor = 0
        for start, end, new in self.edits():
            pieces.append(self.original[cursor:start])
            pieces.append(new)
            cursor = end
        pieces.append(self.original[cursor:])
        return "".join(pieces)

    def check(self) -> None:
        """Raise AssertionError unless the spliced text parses to the edited tree."""
        spliced = parse(self.text(), self.subject).getroot()
        if _canonical(spliced) != _canonical(self.root):
            raise AssertionError("XML text edits diverged from the tree edits")


def _canonical(element: etree._Element) -> bytes:
    # Not C14N: it refuses unresolved entity references. Both sides come from lxml's
    # serializer, so equal bytes mean equal trees (attribute order included).
    return etree.tostring(element)


def _markup(element: etree._Element, quote: str) -> str:
    """Serialize a fresh element (no text, attributes and empty children) in ``quote`` style."""
    attributes = "".join(
        f" {name!s}={quote}{_escape_attribute(str(value), quote)}{quote}"
        for name, value in element.attrib.items()
    )
    local = etree.QName(element).localname
    name = f"{element.prefix}:{local}" if element.prefix else local
    children = [c for c in element if isinstance(c.tag, str)]
    if not children and not element.text:
        return f"<{name}{attributes}/>"
    inner = (element.text or "") + "".join(_markup(c, quote) + (c.tail or "") for c in children)
    return f"<{name}{attributes}>{inner}</{name}>"
