"""Scrape time and report time over a year of a 1,000-domain fleet's history.

Targets (issue 12): a scrape of ``vmtrim exporter`` under 50 ms with 1,000 disks in the
database; ``vmtrim report`` under 2 s from 1,000 domains x 365 runs. Anchors in the same
run: ``sqlite3`` reading every disk row once (the floor for any view of the whole
history), and ``curl`` of a static file served by the same HTTP server (the floor for a
scrape). Prints the figures and the ratios.

    .venv/bin/python bench/bench_report.py [--domains 1000] [--runs 365]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from history_data import make_history


def timed(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=365)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmtrim-bench-report-"))
    t = time.perf_counter()
    small = make_history(work / "scrape.db", args.domains, 3)
    big = make_history(work / "year.db", args.domains, args.runs)
    print(f"generated {args.domains} domains x {args.runs} runs in {time.perf_counter() - t:.1f} s")

    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "exporter", "--listen", f"127.0.0.1:{port}",
         "--db", str(small)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    static_port = free_port()
    (work / "static").mkdir()
    static = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(static_port), "--bind", "127.0.0.1"],
        cwd=work / "static", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                body = urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        (work / "static" / "metrics").write_bytes(body)
        time.sleep(0.5)

        def fetch(u: str) -> None:
            urllib.request.urlopen(u, timeout=10).read()

        scrape = timed(lambda: fetch(url), 20)
        floor = timed(lambda: fetch(f"http://127.0.0.1:{static_port}/metrics"), 20)
        scrape_big = []
        exporter.terminate()
        exporter.wait(10)
        exporter = subprocess.Popen(
            [sys.executable, "-m", "vmtrim", "exporter", "--listen", f"127.0.0.1:{port}",
             "--db", str(big)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        scrape_big = timed(lambda: fetch(url), 5)
    finally:
        exporter.terminate()
        static.terminate()
        exporter.wait(10)
        static.wait(10)

    def sqlite_floor() -> None:
        subprocess.run(
            ["python3", "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
             " c.execute('SELECT SUM(allocated_after) FROM disk_results').fetchall()", str(big)],
            check=True,
        )  # fmt: skip

    def report() -> None:
        subprocess.run(
            [sys.executable, "-m", "vmtrim", "report", "--db", str(big), "-o",
             str(work / "report.html"), "--since", f"{args.runs + 1}d"],
            check=True, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    report_times = timed(report, 3)
    floor_times = timed(sqlite_floor, 3)
    med = statistics.median
    print(f"scrape, {args.domains} disks x 3 runs:   {med(scrape) * 1000:7.1f} ms"
          f"  (static file from http.server: {med(floor) * 1000:.1f} ms;"
          f" ratio {med(scrape) / med(floor):.1f}x)")  # fmt: skip
    print(f"scrape, {args.domains} disks x {args.runs} runs: {med(scrape_big) * 1000:7.1f} ms")
    size = (work / "report.html").stat().st_size
    print(f"report, {args.domains} x {args.runs}:  {med(report_times):7.2f} s"
          f"  (sqlite3 one pass over the disks: {med(floor_times):.2f} s;"
          f" ratio {med(report_times) / med(floor_times):.1f}x);"
          f" {size / 1e6:.1f} MB HTML")  # fmt: skip


if __name__ == "__main__":
    main()
