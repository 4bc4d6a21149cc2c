"""QEMU command-line grammar: the shell words, QEMU's option syntaxes, and edits that keep bytes.

Two layers, both linear in the input:

- :func:`split_words` reads the command line as shell text (or NUL-separated, as
  ``/proc/PID/cmdline``) into :class:`Word` values that remember where each came from
  in the original text, piece by piece (a quoted run, a plain run, an escape);
- :func:`split_commas`, :func:`parse_opts`, :func:`parse_keyval` and
  :func:`parse_json_option` read option values (QemuOpts ``,,`` escaping, dotted
  ``-blockdev`` keys, JSON), with nesting bounded.

:class:`LineEditor` changes word values and inserts words, touching only the bytes of the
changed values: the user's quoting, ``\\`` line continuations, comments, environment
prefix and NUL separators stay as they were, so a diff of the result applies with
``patch``. :func:`opts_set` and :func:`json_set` edit one key of an option value the
same way.

The shell subset accepted: blanks separate words; ``'...'``, ``"..."`` and ``\\x``
quote; ``\\`` + newline continues a line, also inside quotes (pasted command lines
are often wrapped in the middle of a long JSON argument); ``#`` at the start of a word
begins a comment. Anything that would make the shell do more (``|``, ``;``, ``&``,
``<``, ``>``, ``(``, ``)``, backquotes, ``$`` expansions) is refused: vmtrim cannot run
it, and reading ``2>&1`` as a disk image would be wrong.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from vmtrim.errors import BadInput
from vmtrim.model import Discard, as_discard
from vmtrim.output import safe_text

# The kernel refuses an argv over ARG_MAX (2 MiB with the default 8 MiB stack); a
# command-line file is allowed comments and layout on top of that.
MAX_COMMAND_LINE = 8 << 20
# Real option values nest a few levels (a format node, its file, a server dict).
MAX_NESTING = 64


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Options without an argument (QEMU accepts -opt and --opt). Generous: includes
# options that older QEMU releases had, so old command lines still parse.
FLAG_OPTIONS = _words("""
h help version S s snapshot enable-kvm no-kvm nographic no-user-config nodefaults no-acpi
no-hpet no-reboot no-shutdown no-fd-bootchk full-screen daemonize mem-prealloc
only-migratable portrait singlestep usb win2k-hack xen-attach xen-domid-restrict preconfig
enable-sync-profile async-teardown audio-help curses no-quit alt-grab ctrl-grab no-frame
semihosting enable-fips no-kvm-irqchip no-kvm-pit no-kvm-pit-reinjection tdf show-cursor
sdl localtime enable-nesting no-shutdown-on-crash old-param nouserconfig nodefconfig
""")

# Options that take one argument.
ARG_OPTIONS = _words("""
machine M cpu accel smp numa add-fd set global boot m mem-path k audio audiodev soundhw device
name uuid fda fdb hda hdb hdc hdd cdrom blockdev drive mtdblock sd pflash fsdev virtfs iscsi
usbdevice display vga rotate g vnc spice monitor qmp qmp-pretty mon debugcon pidfile chardev
serial parallel rtc icount watchdog watchdog-action action echr incoming xen-domid loadvm
kernel append initrd dtb bios L D d dfilter seed trace plugin sandbox runas chroot readconfig
writeconfig msg overcommit object tpmdev fw_cfg smbios acpitable option-rom netdev nic net bt
gdb compat prom-env semihosting-config dump-vmstate run-with tb-size qtest qtest-log balloon
kvm-shadow-memory mem-merge xen-create hot-add virtioconsole clock redir smb tftp bootp
nvram cpu-throttle realtime
""")

# Options that downstream QEMU builds add, with an argument: the README lists them.
DOWNSTREAM_OPTIONS = {
    "id": "Proxmox VE (pve-qemu): the VM id",
}


def shown(value: object, limit: int = 80) -> str:
    """Untrusted text for a message: control characters escaped, at most ``limit`` long."""
    text = safe_text(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def option_name(token: str) -> str | None:
    """``-drive``/``--drive`` -> ``drive``; None for a word that is not an option."""
    if not token.startswith("-") or token == "-" or token == "--":
        return None
    return token[2:] if token.startswith("--") else token[1:]


# ---------------------------------------------------------------- shell words

PieceKind = Literal["plain", "single", "double", "raw", "escape"]


@dataclass(frozen=True)
class Piece:
    """A run of a word's value and where it stands in the text.

    For every kind but ``escape`` the value characters ``[offset, offset + length)``
    are the text characters ``[start, start + length)``, one for one, so an edit
    inside the run maps straight back to the text. An ``escape`` is ``\\x``: one value
    character, two text characters.
    """

    kind: PieceKind
    offset: int  # in the word's value
    start: int  # in the text
    length: int  # value characters


@dataclass(frozen=True)
class Word:
    """One argv element, with the span ``[start, end)`` of the text it came from."""

    value: str
    start: int
    end: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Line:
    """A command line split into words: the text (decoded), its words, and its form."""

    text: str
    words: tuple[Word, ...]
    nul: bool  # NUL-separated (/proc/PID/cmdline) rather than shell text

    @property
    def argv(self) -> list[str]:
        return [word.value for word in self.words]


# One regular expression step per run, never per character: a 1 MiB word is a few steps.
_BLANKS = re.compile(r"(?:[ \t\r\n]|\\\r?\n)+")
_PLAIN = re.compile(r"[^\s'\"\\#|;&<>()`$]+")
_SINGLE = re.compile(r"[^'\\]+|\\\r?\n|\\")
_DOUBLE = re.compile(r'[^"\\$`]+|\\\r?\n|\\[$`"\\]|\\|\$(?![A-Za-z_{(0-9@*#?$!-])')
_CONTINUATION = re.compile(r"\\\r?\n")
_SHELL_ONLY = "|;&<>()`"
_SPLIT = "cannot split the command line"


def decode(data: bytes | str) -> str:
    """Bytes as text; bytes that are not UTF-8 survive a round trip (surrogateescape)."""
    return data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def split_words(data: bytes | str, subject: str = "<args>") -> Line:
    """Split a command line into :class:`Word` values; NUL-separated input is taken as is.

    :raises BadInput: over :data:`MAX_COMMAND_LINE`, an unterminated quote, or shell
        syntax vmtrim does not interpret.
    """
    if len(data) > MAX_COMMAND_LINE:
        raise BadInput(
            f"command line over {MAX_COMMAND_LINE >> 20} MiB: not a QEMU command line",
            subject=subject,
        )
    text = decode(data)
    if "\0" in text:
        return Line(text, tuple(_nul_words(text)), nul=True)
    return Line(text, tuple(_shell_words(text, subject)), nul=False)


def _nul_words(text: str) -> list[Word]:
    words = []
    start = 0
    end = len(text) - 1 if text.endswith("\0") else len(text)
    while start <= end:
        stop = text.find("\0", start, end)
        stop = end if stop < 0 else stop
        value = text[start:stop]
        words.append(Word(value, start, stop, (Piece("raw", 0, start, len(value)),)))
        start = stop + 1
    return words


def _shell_words(text: str, subject: str) -> list[Word]:
    words: list[Word] = []
    pos, size = 0, len(text)
    while True:
        blank = _BLANKS.match(text, pos)
        if blank:
            pos = blank.end()
        if pos >= size:
            return words
        if text[pos] == "#":  # a comment runs to the end of the line
            newline = text.find("\n", pos)
            pos = size if newline < 0 else newline
            continue
        word, pos = _one_word(text, pos, subject)
        words.append(word)


def _one_word(text: str, pos: int, subject: str) -> tuple[Word, int]:
    start, size = pos, len(text)
    parts: list[str] = []
    pieces: list[Piece] = []
    length = 0

    def add(kind: PieceKind, value: str, at: int) -> None:
        nonlocal length
        parts.append(value)
        pieces.append(Piece(kind, length, at, len(value)))
        length += len(value)

    while pos < size:
        char = text[pos]
        if char in " \t\r\n":
            break
        if char == "\\":
            continuation = _CONTINUATION.match(text, pos)
            if continuation:
                pos = continuation.end()
                if pos >= size or text[pos] in " \t\r\n":
                    break
                continue
            if pos + 1 >= size:
                raise BadInput(f"{_SPLIT}: it ends with a lone '\\'", subject=subject)
            add("escape", text[pos + 1], pos)
            pos += 2
        elif char == "'":
            pos = _quoted(text, pos, "'", _SINGLE, "single", add, subject)
        elif char == '"':
            pos = _quoted(text, pos, '"', _DOUBLE, "double", add, subject)
        elif char in _SHELL_ONLY or (char == "$" and _expands(text, pos)):
            raise BadInput(
                f"{_SPLIT}: shell syntax {safe_text(char)!r} at offset {pos}:"
                " vmtrim reads one command, not a script"
                " (quote the character if it is part of a value)",
                subject=subject,
            )
        else:
            match = _PLAIN.match(text, pos)
            end = match.end() if match else pos + 1  # a '#' or '$' inside a word is literal
            add("plain", text[pos:end], pos)
            pos = end
    return Word("".join(parts), start, pos, tuple(pieces)), pos


def _expands(text: str, pos: int) -> bool:
    return pos + 1 < len(text) and (text[pos + 1] in "'\"{(@*#?$!-_" or text[pos + 1].isalnum())


def _quoted(
    text: str,
    pos: int,
    quote: str,
    runs: re.Pattern[str],
    kind: PieceKind,
    add: Any,
    subject: str,
) -> int:
    opened = pos
    pos += 1
    while True:
        if pos >= len(text):
            raise BadInput(
                f"{_SPLIT}: unterminated {quote} quote opened at offset {opened}", subject=subject
            )
        if text[pos] == quote:
            return pos + 1
        match = runs.match(text, pos)
        if match is None:  # '$(' or a backquote inside double quotes
            raise BadInput(
                f"{_SPLIT}: shell expansion at offset {pos} inside a double-quoted word:"
                " vmtrim cannot expand it",
                subject=subject,
            )
        run = match.group()
        if run.startswith("\\") and run.endswith("\n"):
            pass  # a continuation, even inside quotes
        elif kind == "double" and len(run) == 2 and run[0] == "\\":
            add("escape", run[1], pos)
        else:
            add(kind, run, pos)
        pos = match.end()


# ---------------------------------------------------------------- quoting new text


_SAFE_PLAIN = re.compile(r"[\w@%+=:,./-]*", re.ASCII)


def quote_for(kind: PieceKind, value: str) -> str:
    """``value`` written inside a piece of ``kind``, so that it reads back as ``value``."""
    if kind == "raw":
        return value
    if _CONTINUATION.search(value):  # only double quotes keep a backslash-newline
        closing = {"single": "'", "double": '"'}.get(kind, "")
        return closing + _double_quoted(value) + closing
    if kind == "single":
        return value.replace("'", "'\\''")
    if kind == "double":
        return _double_quoted(value)[1:-1]
    return quote_word(value, False)


def _double_quoted(value: str) -> str:
    return '"' + re.sub(r'([\\"$`])', r"\\\1", value) + '"'


def quote_word(value: str, nul: bool) -> str:
    """``value`` as a whole word: as is for NUL-separated text, else shell-quoted."""
    if nul or (value and _SAFE_PLAIN.fullmatch(value)):
        return value
    if _CONTINUATION.search(value):
        return _double_quoted(value)
    return shlex.quote(value)


# ---------------------------------------------------------------- editing the line


@dataclass
class LineEditor:
    """Edits to a :class:`Line`: new values for words, new words after a word.

    :meth:`render` returns the new text and argv; only changed values and inserted
    words differ from the original text.
    """

    line: Line
    values: dict[int, str] = field(default_factory=dict)
    inserts: dict[int, list[list[str]]] = field(default_factory=dict)  # after word -> groups

    def value(self, index: int) -> str:
        return self.values.get(index, self.line.words[index].value)

    def set_value(self, index: int, value: str) -> None:
        self.values[index] = value

    def insert_after(self, index: int, words: list[str]) -> None:
        """Insert ``words`` (one option and its value) after word ``index`` (-1: first)."""
        self.inserts.setdefault(index, []).append(words)

    def new_index(self) -> list[int]:
        """Where each original word stands in the new argv."""
        where, at = [], len(self._inserted(-1))
        for index in range(len(self.line.words)):
            where.append(at)
            at += 1 + len(self._inserted(index))
        return where

    def inserted_at(self, index: int, group: int, new_index: list[int] | None = None) -> int:
        """Where the last word of insert group ``group`` after word ``index`` stands."""
        base = -1 if index < 0 else (new_index or self.new_index())[index]
        groups = self.inserts[index]
        return base + sum(len(g) for g in groups[: group + 1])

    def _inserted(self, index: int) -> list[str]:
        return [word for group in self.inserts.get(index, []) for word in group]

    def argv(self) -> list[str]:
        out = self._inserted(-1)
        for index in range(len(self.line.words)):
            out.append(self.value(index))
            out.extend(self._inserted(index))
        return out

    def edits(self) -> list[tuple[int, int, str]]:
        """The text edits, as ``(start, end, replacement)`` in the original, in order."""
        line = self.line
        edits: list[tuple[int, int, str]] = []
        for index, value in self.values.items():
            word = line.words[index]
            if value != word.value:
                edits.append(_value_edit(word, value, line.nul))
        for index, groups in self.inserts.items():
            edits.append(self._insert_edit(index, groups))
        edits.sort(key=lambda edit: (edit[0], edit[1]))
        return edits

    def render(self, subject: str = "<args>") -> str:
        """The edited text; it splits back into exactly :meth:`argv` (checked)."""
        text = self.line.text
        out, pos = [], 0
        for start, end, new in self.edits():
            out.append(text[pos:start])
            out.append(new)
            pos = end
        out.append(text[pos:])
        result = "".join(out)
        if split_words(result, subject).argv != self.argv():
            raise AssertionError(f"{subject}: the edited command line does not read back")
        return result

    def _insert_edit(self, index: int, groups: list[list[str]]) -> tuple[int, int, str]:
        line, words = self.line, self.line.words
        if line.nul:
            joined = "".join("\0" + "\0".join(group) for group in groups)
            if index < 0:
                return words[0].start, words[0].start, joined[1:] + "\0"
            return words[index].end, words[index].end, joined
        sep = self._separator(index)
        joined = "".join(sep + " ".join(quote_word(w, False) for w in group) for group in groups)
        if index < 0:
            return words[0].start, words[0].start, joined[len(sep) :] + sep
        return words[index].end, words[index].end, joined

    def _separator(self, index: int) -> str:
        """The blanks the user put between options here (`` \\<newline>  `` or a space)."""
        words, text = self.line.words, self.line.text
        for a, b in ((index, index + 1), (index - 2, index - 1), (index - 1, index)):
            if a >= 0 and b < len(words):
                gap = text[words[a].end : words[b].start]
                if _BLANKS.fullmatch(gap) and "\n" in gap:
                    return gap
        return " "


def _value_edit(word: Word, value: str, nul: bool) -> tuple[int, int, str]:
    """The smallest text edit that turns ``word`` into ``value``, else the whole word."""
    old = word.value
    limit = min(len(old), len(value))
    prefix = 0
    while prefix < limit and old[prefix] == value[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and old[-1 - suffix] == value[-1 - suffix]:
        suffix += 1
    a, b = prefix, len(old) - suffix
    new = value[prefix : len(value) - suffix]
    for piece in word.pieces:
        if piece.kind == "escape":
            continue
        lo, hi = piece.offset, piece.offset + piece.length
        if lo <= a and b <= hi:
            start = piece.start + (a - lo)
            return start, start + (b - a), quote_for(piece.kind, new)
    return word.start, word.end, quote_word(value, nul)


# ---------------------------------------------------------------- option values


def _comma_parts(text: str) -> list[tuple[int, int]]:
    """Spans of the comma-separated parts of ``text`` (``,,`` stays inside a part)."""
    spans, start, pos = [], 0, 0
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            spans.append((start, len(text)))
            return spans
        if text.startswith(",,", comma):
            pos = comma + 2
            continue
        spans.append((start, comma))
        start = pos = comma + 1


def split_commas(text: str) -> list[str]:
    """Split QEMU option text on ``,``; ``,,`` is a literal comma."""
    parts = (text[a:b].replace(",,", ",") for a, b in _comma_parts(text))
    return [part for part in parts if part]


def escape_commas(text: str) -> str:
    return text.replace(",", ",,")


def parse_opts(text: str, implied: str | None = None) -> dict[str, Any]:
    """QemuOpts syntax (``-drive``, ``-device``, ``-machine``): a flat dict of strings.

    A bare first word is the implied key (the device driver, the machine type); any
    other bare word is a boolean set to ``on``.
    """
    result: dict[str, Any] = {}
    for index, part in enumerate(split_commas(text)):
        key, sep, value = part.partition("=")
        if sep:
            result[key] = value
        elif index == 0 and implied:
            result[implied] = part
        else:
            result[part] = "on"
    return result


def opts_set(text: str, key: str, value: str) -> str:
    """``text`` with ``key=value`` (replacing the value in place, or appended)."""
    for a, b in _comma_parts(text):
        part = text[a:b]
        if part.replace(",,", ",").partition("=")[0] == key and "=" in part:
            eq = text.index("=", a)
            return text[: eq + 1] + escape_commas(value) + text[b:]
    trailing = len(text) - len(text.rstrip(","))
    joiner = "" if text == "" or trailing % 2 else ","  # an odd comma run ends in a separator
    return text + joiner + escape_commas(f"{key}={value}")


def opts_drop(text: str, keys: set[str]) -> str:
    """``text`` without the parts whose key is in ``keys``."""
    kept = [
        text[a:b]
        for a, b in _comma_parts(text)
        if text[a:b] and text[a:b].replace(",,", ",").partition("=")[0] not in keys
    ]
    return ",".join(kept)


def parse_keyval(text: str, subject: str, option: str) -> dict[str, Any]:
    """``-blockdev`` key=value syntax: dotted keys make nested dicts."""
    result: dict[str, Any] = {}
    for part in split_commas(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise BadInput(
                f"{option} {shown(text)!r}: {shown(part)!r} is not key=value",
                subject=subject,
            )
        *path, last = key.split(".")
        if len(path) > MAX_NESTING:
            raise BadInput(f"{option}: keys nested more than {MAX_NESTING} levels deep", subject)
        target = result
        for step in path:
            nested = target.setdefault(step, {})
            if not isinstance(nested, dict):
                raise BadInput(
                    f"{option}: {shown(key)!r} conflicts with {shown(step)!r}={shown(nested)!r}",
                    subject=subject,
                )
            target = nested
        if isinstance(target.get(last), dict):
            raise BadInput(
                f"{option}: {shown(key)!r} conflicts with '{shown(last)}.*'",
                subject=subject,
            )
        target[last] = value
    return result


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+|\s+', re.S)
_JSON_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', re.S)


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for match in _JSON_BRACKETS.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json_option(text: str, subject: str, option: str) -> dict[str, Any]:
    """A JSON option value (``-blockdev '{...}'``): an object nested at most MAX_NESTING deep."""
    if _json_depth(text) > MAX_NESTING:
        raise BadInput(f"{option}: JSON nested more than {MAX_NESTING} levels deep", subject)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise BadInput(f"{option}: invalid JSON: {shown(detail)}", subject=subject) from exc
    if not isinstance(value, dict):
        raise BadInput(f"{option}: JSON must be an object", subject=subject)
    return value


def json_set(text: str, path: tuple[str, ...], key: str, value: Any) -> str:
    """JSON ``text`` with ``key`` set to ``value`` in the object at ``path``, edited in place.

    The rest of the text keeps its bytes (spacing, key order, escapes). ``text`` must be
    valid JSON whose object at ``path`` exists.
    """
    stack: list[dict[str, Any]] = []  # per open container: keys, path, members
    target: dict[str, Any] | None = None
    pending_key: str | None = None
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token.isspace():
            continue
        top = stack[-1] if stack else None
        if token in "{[":
            where: tuple[str, ...] = ()
            if top is not None:
                where = (*top["path"], pending_key) if top["object"] and pending_key else ("?",)
                if top["object"] and pending_key is not None:
                    top["members"][pending_key] = [match.start(), None]
            stack.append({"object": token == "{", "path": where, "members": {}, "count": 0})
            pending_key = None
        elif token in "}]":
            closed = stack.pop()
            if closed["object"] and closed["path"] == path:
                target = {**closed, "close": match.start()}
            if stack and stack[-1]["object"]:
                for span in stack[-1]["members"].values():
                    if span[1] is None:
                        span[1] = match.end()
        elif token == ":":
            continue
        elif token == ",":
            pending_key = None
        elif top is not None and top["object"] and pending_key is None:
            pending_key = json.loads(token)
            top["count"] += 1
        elif top is not None and top["object"]:
            top["members"][pending_key] = [match.start(), match.end()]
    if target is None:
        raise ValueError(f"no JSON object at {path}")
    encoded = json.dumps(value, ensure_ascii=False)
    if key in target["members"]:
        start, end = target["members"][key]
        return text[:start] + encoded + text[end:]
    spaced = '": ' in text
    member = f'"{key}": {encoded}' if spaced else f'"{key}":{encoded}'
    close = target["close"]
    body = text[:close].rstrip()
    lead = "" if body.endswith("{") else (", " if spaced else ",")
    return body + lead + member + text[len(body) : close] + text[close:]


def flag(value: Any) -> bool:
    """A QemuOpts boolean (on/true/yes/1) or a JSON one."""
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("on", "true", "yes", "1")


def normalize_discard(value: Any) -> Discard | None:
    """QEMU accepts discard=on|unmap|off|ignore; the model says unmap or ignore."""
    return as_discard(value)
