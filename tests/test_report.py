"""Metrics, the exporter and the HTML report, from a history written by real runs.

Two lab guests under the real libvirtd: one whose discard path is good (it frees
32 MiB before the first ``vmtrim run``), one whose ``<driver>`` has no discard (the run
records it ``blocked``). Two runs of a policy fill the history. Then:

- promtool (Debian's prometheus package) checks ``vmtrim metrics`` and the textfile;
- a real Prometheus server on a loopback port scrapes ``vmtrim exporter``, and its
  query API returns ``vmtrim_disk_reclaimed_bytes_total`` with the value in the history;
- headless Chromium opens the report from disk with every request sent to a proxy
  that records it: the DOM holds the charts with the history's data points, and the
  proxy saw nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import html as lxml_html
from prometheus_client.parser import text_string_to_metric_families

from helpers import vmtrim
from test_live_libvirt import Lab, LabDomain, conn  # noqa: F401  (module fixtures)
from test_live_libvirt import lab as lab

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]

WRITE_MIB = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def recorded(lab: Lab, libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs of a policy over a good and a blocked guest; the database they wrote."""
    good = lab.start("rgood", write_mib=WRITE_MIB)
    blocked = lab.start("rblock", discard=False, agent=False)
    good.until_deleted()
    root = tmp_path_factory.mktemp("report")
    policy = root / "policy.toml"
    policy.write_text(
        f'connect = ["{libvirtd}"]\ninclude = ["{good.name}", "{blocked.name}"]\n'
        f'minimum = 0\ntimeout = 120\ntextfile = "{root / "collector"}"\n'
    )
    (root / "collector").mkdir()
    db = root / "history.db"
    docs = []
    for _ in range(2):
        done = vmtrim("run", "--policy", str(policy), "--db", str(db), "--json")
        assert done.returncode in (0, 1), done.stderr
        docs.append(json.loads(done.stdout))
    return {"db": db, "good": good, "blocked": blocked, "runs": docs, "root": root}


def history_rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the database directly, not through vmtrim: the test's own view of it."""
    with sqlite3.connect(db) as c:
        return c.execute(sql, params).fetchall()


def reclaimed_in_history(db: Path, domain: str) -> int:
    ((total,),) = history_rows(
        db,
        "SELECT SUM(MAX(d.reclaimed, 0)) FROM disk_results d"
        " JOIN domain_results r ON r.id = d.result_id WHERE r.domain = ?",
        domain,
    )
    return int(total)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def find(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    hits = [
        v
        for (n, ls), v in metrics.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    ]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_history_has_what_the_runs_did(recorded: dict[str, Any]) -> None:
    good: LabDomain = recorded["good"]
    rows = history_rows(
        recorded["db"],
        "SELECT domain, status, blocking_layer FROM domain_results ORDER BY id",
    )
    statuses = {(d, s, layer) for d, s, layer in rows}
    assert (recorded["blocked"].name, "blocked", "block_node") in statuses
    assert (good.name, "trimmed", None) in statuses
    # The first run got back what the guest freed; the second had nothing left.
    assert reclaimed_in_history(recorded["db"], good.name) >= 0.99 * WRITE_MIB * 2**20


def test_promtool_accepts_metrics_and_textfile(recorded: dict[str, Any]) -> None:
    printed = vmtrim("metrics", "--db", str(recorded["db"]))
    assert printed.returncode == 0, printed.stderr
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=printed.stdout, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    textdir = recorded["root"] / "textfile"
    textdir.mkdir()
    written = vmtrim("metrics", "--textfile", str(textdir), "--db", str(recorded["db"]))
    assert written.returncode == 0, written.stderr
    prom = (textdir / "vmtrim.prom").read_text()
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=prom, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(p.name for p in textdir.iterdir()) == ["vmtrim.prom"]  # no temp file left
    # vmtrim run wrote the policy's textfile after its last run, from the same history.
    ran = (recorded["root"] / "collector" / "vmtrim.prom").read_text()
    assert samples(ran) == samples(prom)


def test_metric_values_are_the_history(recorded: dict[str, Any]) -> None:
    good: LabDomain = recorded["good"]
    metrics = samples(vmtrim("metrics", "--db", str(recorded["db"])).stdout)
    assert find(metrics, "vmtrim_history_up") == 1
    assert find(
        metrics, "vmtrim_disk_reclaimed_bytes_total", domain=good.name, target="sda"
    ) == reclaimed_in_history(recorded["db"], good.name)
    ((after,),) = history_rows(
        recorded["db"],
        "SELECT d.allocated_after FROM disk_results d JOIN domain_results r"
        " ON r.id = d.result_id WHERE r.domain = ? ORDER BY r.id DESC LIMIT 1",
        good.name,
    )
    assert find(metrics, "vmtrim_disk_allocated_bytes", domain=good.name) == after
    assert (
        find(metrics, "vmtrim_disk_discard_path", domain=recorded["blocked"].name, verdict="block")
        == 1
    )
    assert find(metrics, "vmtrim_domain_trims_total", domain=good.name, status="trimmed") == 2


def test_missing_or_corrupt_database_is_history_up_zero(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database" * 100)
    for db in (tmp_path / "missing.db", corrupt):
        done = vmtrim("metrics", "--db", str(db))
        assert done.returncode == 0 and done.stderr == ""
        assert find(samples(done.stdout), "vmtrim_history_up") == 0


def _wait_http(url: str, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return bytes(reply.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each stopped by its PID afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_real_prometheus_scrapes_the_exporter(
    recorded: dict[str, Any], tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    good: LabDomain = recorded["good"]
    port, prom_port = free_port(), free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "exporter", "--listen", f"127.0.0.1:{port}",
         "--db", str(recorded["db"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(exporter)
    scraped = _wait_http(f"http://127.0.0.1:{port}/metrics", 30).decode()
    assert "vmtrim_disk_reclaimed_bytes_total" in scraped
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: vmtrim\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started.append(prometheus)
    query = urllib.parse.urlencode(
        {"query": f'vmtrim_disk_reclaimed_bytes_total{{domain="{good.name}"}}'}
    )
    deadline = time.monotonic() + 90
    result: list[Any] = []
    while not result and time.monotonic() < deadline:
        try:
            body = _wait_http(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}", 30)
            result = json.loads(body)["data"]["result"]
        except OSError:
            pass
        time.sleep(1)
    assert result, "Prometheus never stored the exporter's sample"
    assert float(result[0]["value"][1]) == reclaimed_in_history(recorded["db"], good.name)
    assert result[0]["metric"]["job"] == "vmtrim"


def test_non_loopback_listen_warns(tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "exporter", "--listen", f"0.0.0.0:{port}",
         "--db", str(tmp_path / "none.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(proc)
    body = _wait_http(f"http://127.0.0.1:{port}/metrics", 30).decode()
    assert "vmtrim_history_up 0.0" in body
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "is not loopback" in err.decode().splitlines()[0]


class RecordingProxy:
    """A TCP listener that records every connection: Chromium's proxy for the report test."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            with client:
                client.settimeout(1)
                try:
                    self.seen.append(client.recv(4096))
                except OSError:
                    self.seen.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# Chromium's own services still call home with every feature switch off; they are the
# browser's requests, not the page's, and never name the page.
BROWSER_SERVICES = re.compile(
    rb"^(CONNECT |[A-Z]+ http://)"
    rb"(update\.googleapis\.com|accounts\.google\.com|clients2\.google\.com|[a-z0-9-]+\.gvt1\.com)"
    rb"[:/]"
)


def chromium(*args: str, proxy: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-default-apps", "--metrics-recording-only",
         "--no-pings", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
         # Chromium's own background services; what is left is the page's.
         "--disable-features=NetworkTimeServiceQuerying,Translate,OptimizationHints,"
         "MediaRouter,AutofillServerCommunication,CertificateTransparencyComponentUpdater,"
         "SignInProfileCreation,PushMessaging",
         "--component-updater=disable-background-downloads,disable-delta-updates",
         "--disable-extensions",
         f"--proxy-server=http://127.0.0.1:{proxy}", "--proxy-bypass-list=<-loopback>",
         *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def elements(tree: Any, path: str) -> list[Any]:
    """The elements an XPath selects (lxml types its results as a wide union)."""
    found = tree.xpath(path)
    assert isinstance(found, list)
    return [e for e in found if hasattr(e, "get")]


def strings(tree: Any, path: str) -> list[str]:
    found = tree.xpath(path)
    assert isinstance(found, list)
    return [str(s) for s in found]


def test_report_opens_offline_in_chromium_with_the_history(
    recorded: dict[str, Any], tmp_path: Path
) -> None:
    good: LabDomain = recorded["good"]
    page = tmp_path / "report.html"
    done = vmtrim("report", "--db", str(recorded["db"]), "-o", str(page), "--since", "1d")
    assert done.returncode == 0, done.stderr
    proxy = RecordingProxy()
    try:
        dom = chromium("--dump-dom", page.as_uri(), proxy=proxy.port)
        shot = tmp_path / "report.png"
        chromium(f"--screenshot={shot}", "--window-size=1280,1800", page.as_uri(),
                 proxy=proxy.port)  # fmt: skip
    finally:
        proxy.close()
    assert dom.returncode == 0, dom.stderr[-2000:]
    page_requests = [r for r in proxy.seen if not BROWSER_SERVICES.match(r)]
    assert page_requests == [], page_requests  # the page asked for nothing
    tree = lxml_html.fromstring(dom.stdout)
    assert not elements(tree, "//*[@src] | //link[@href] | //*[@srcset]")
    # The fleet chart: one point per run, each the sum of that run's allocation.
    points = elements(tree, '//svg[@id="fleet-chart"]//circle[@class="point"]')
    runs = history_rows(
        recorded["db"],
        "SELECT r.run_id, SUM(COALESCE(d.allocated_after, d.allocated_before)),"
        " SUM(MAX(d.reclaimed, 0)) FROM domain_results r JOIN disk_results d"
        " ON d.result_id = r.id GROUP BY r.run_id ORDER BY r.run_id",
    )
    assert [(int(p.get("data-allocated")), int(p.get("data-reclaimed"))) for p in points] == [
        (allocated, reclaimed) for _, allocated, reclaimed in runs
    ]
    bars = elements(tree, '//svg[@id="reclaimed-chart"]//rect[@class="bar"]')
    assert [int(b.get("data-reclaimed")) for b in bars] == [r for *_, r in runs]
    assert int(strings(tree, '//*[@id="sum-reclaimed"]/@data-v')[0]) == reclaimed_in_history(
        recorded["db"], good.name
    )
    blocked = strings(tree, '//table[@id="blocked"]//tr/td[2]/text()')
    assert blocked == [recorded["blocked"].name]
    wasters = elements(tree, '//table[@id="wasters"]/tbody/tr')
    assert len(wasters) == 2
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # VMTRIM_REPORT_PNG=docs/report.png keeps the screenshot of this real run for the README.
    if os.environ.get("VMTRIM_REPORT_PNG"):
        shutil.copyfile(shot, os.environ["VMTRIM_REPORT_PNG"])
