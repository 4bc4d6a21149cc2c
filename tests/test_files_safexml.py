"""What held in the adversarial pass, pinned: hostile XML is never resolved nor fetched.

XXE, parameter entities (from a file and over HTTP), XInclude, billion laughs and the
quadratic blowup go through `vmtrim audit --xml` and `vmtrim fix --xml` as a user runs
them, under the 1 GiB memory cap of files_support: the secret file never reaches the
output, no request reaches the local HTTP server, entity references are kept verbatim by
fix, and an expansion that would be gigabytes stays a few hundred bytes.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from files_support import vmtrim
from vmtrim._util.safexml import parse

SECRET = "TOPSECRET-vmtrim-7f3a"
DEVICES = (
    "<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>"
    "<source file='/var/lib/libvirt/images/x.raw'/><target dev='sda' bus='scsi'/></disk>"
    "<controller type='scsi' index='0' model='virtio-scsi'/></devices>"
)


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []  # replaced per server by the fixture

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = f'<!ENTITY leak "{SECRET}">'.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_dtd() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server serving a DTD that defines &leak;; yields (URL, requests seen)."""
    hits: list[str] = []
    handler = type("Handler", (_Counting,), {"hits": hits})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/evil.dtd", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.fixture
def secret_files(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "evil.dtd").write_text(f'<!ENTITY leak SYSTEM "file://{tmp_path}/secret">\n')
    return tmp_path


def laughs(levels: int, fan: int) -> str:
    """Billion laughs: ``fan ** levels`` copies of "lol" if expanded."""
    ents = ['<!ENTITY l0 "lol">'] + [
        f'<!ENTITY l{i} "{f"&l{i - 1};" * fan}">' for i in range(1, levels + 1)
    ]
    return f"<!DOCTYPE domain [{''.join(ents)}]><domain><name>&l{levels};</name>{DEVICES}</domain>"


def quadratic() -> str:
    """One 100 kB entity referenced 10,000 times: a gigabyte if expanded."""
    big = "A" * 100_000
    refs = "&big;" * 10_000
    return f'<!DOCTYPE domain [<!ENTITY big "{big}">]><domain><name>{refs}</name>{DEVICES}</domain>'


def hostile(kind: str, where: Path, url: str) -> str:
    docs = {
        "xxe": f'<!DOCTYPE domain [<!ENTITY e SYSTEM "file://{where}/secret">]>'
        f"<domain><name>&e;</name>{DEVICES}</domain>",
        "parameter-file": f'<!DOCTYPE domain [<!ENTITY % p SYSTEM "file://{where}/evil.dtd"> %p;]>'
        f"<domain><name>&leak;</name>{DEVICES}</domain>",
        "parameter-http": f'<!DOCTYPE domain [<!ENTITY % p SYSTEM "{url}"> %p;]>'
        f"<domain><name>&leak;</name>{DEVICES}</domain>",
        "external-dtd": f'<!DOCTYPE domain SYSTEM "{url}"><domain><name>&leak;</name>{DEVICES}'
        "</domain>",
        "xinclude": "<domain xmlns:xi='http://www.w3.org/2001/XInclude'><name>x<xi:include"
        f" href='file://{where}/secret' parse='text'/></name>{DEVICES}</domain>",
        "billion-laughs": laughs(9, 10),
        "quadratic": quadratic(),
    }
    return docs[kind]


KINDS = [
    "xxe",
    "parameter-file",
    "parameter-http",
    "external-dtd",
    "xinclude",
    "billion-laughs",
    "quadratic",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["audit", "fix"])
def test_hostile_xml_through_the_cli(
    kind: str, command: str, secret_files: Path, http_dtd: tuple[str, list[str]]
) -> None:
    url, hits = http_dtd
    path = secret_files / f"{kind}.xml"
    text = hostile(kind, secret_files, url)
    path.write_text(text)
    result = vmtrim(command, "--no-probe", "--json", "--xml", str(path))
    # Refused (one line, exit 2) or audited/fixed (0 or 1); never a crash or a leak.
    assert result.returncode in (0, 1, 2), result.stderr
    if result.returncode == 2:
        assert result.stderr.startswith(f"vmtrim: {path}: ") and result.stderr.count("\n") == 1
    assert SECRET not in result.stdout + result.stderr
    assert "lollollol" not in result.stdout and "AAAAAAAAAA" * 10 not in result.stdout
    assert hits == []  # nothing was fetched
    # The output is about as big as the input: nothing was expanded.
    assert len(result.stdout) < 4 * len(text) + 20_000


@pytest.mark.parametrize("kind", ["billion-laughs", "quadratic"])
@pytest.mark.parametrize("command", ["audit", "fix"])
def test_amplification_is_refused_in_one_line(kind: str, command: str, tmp_path: Path) -> None:
    path = tmp_path / "dom.xml"
    path.write_text(hostile(kind, tmp_path, ""))
    result = vmtrim(command, "--no-probe", "--xml", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"vmtrim: {path}: malformed XML")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize("kind", ["xxe", "parameter-file"])
def test_fix_keeps_entity_references_verbatim(kind: str, secret_files: Path) -> None:
    text = hostile(kind, secret_files, "http://127.0.0.1:9/unused.dtd")
    path = secret_files / "dom.xml"
    path.write_text(text)
    result = vmtrim("fix", "--no-probe", "--xml", str(path))
    assert result.returncode == 0, result.stderr
    name = text[text.index("<name>") : text.index("</name>") + len("</name>")]
    assert name in result.stdout  # the reference itself, unexpanded
    assert "discard='unmap'" in result.stdout


def test_parse_leaves_references_unresolved(secret_files: Path) -> None:
    tree = parse(hostile("xxe", secret_files, ""))
    name = tree.getroot().find("name")
    assert name is not None and SECRET not in "".join(str(t) for t in name.itertext())
    include = parse(hostile("xinclude", secret_files, "")).getroot().find("name")
    assert include is not None and len(include) == 1  # the xi:include element, as written
