"""``vmtrim exporter``: serve ``/metrics`` from the history database for Prometheus.

The HTTP server is prometheus_client's. It listens on loopback unless told otherwise;
a non-loopback ``--listen`` prints a warning, because the metrics name every domain
and disk of the host. A scrape only reads the database. SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import ipaddress
import signal
import threading
from pathlib import Path

import click

from vmtrim.cli.options import db_option
from vmtrim.errors import EXIT_OK, BadInput

DEFAULT_LISTEN = "127.0.0.1:9864"


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[v6]:PORT`` -> (addr, port); BadInput otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
        ipaddress.ip_address(host)
    except ValueError:
        number = -1
    if not sep or not 0 < number < 65536:
        raise BadInput("not ADDRESS:PORT (an IP address and a port)", subject=f"--listen {text}")
    return host, number


@click.command("exporter")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="ADDR:PORT")
@db_option
def exporter(listen: str, db: Path | None) -> int:
    """Serve /metrics from the history database (Prometheus text format)."""
    from prometheus_client import start_http_server

    from vmtrim.output import print_note
    from vmtrim.report.metrics import registry_for

    host, port = parse_listen(listen)
    if not ipaddress.ip_address(host).is_loopback:
        click.echo(
            f"vmtrim: warning: --listen {listen} is not loopback: anyone who can reach it "
            "sees every domain and disk name of this host",
            err=True,
        )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server, thread = start_http_server(port, addr=host, registry=registry_for(db))
    except OSError as exc:
        raise BadInput(f"cannot listen: {exc.strerror}", subject=f"--listen {listen}") from exc
    print_note(f"serving http://{listen}/metrics", err=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        thread.join(5)
    return EXIT_OK
