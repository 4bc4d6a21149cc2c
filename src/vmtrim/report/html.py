"""``vmtrim report``: one self-contained HTML file about the fleet's space.

No network, no CDN, no external file: the charts are inline SVG written here, the
styles and the table sorting are inline, and a Content-Security-Policy forbids every
fetch, so the page opens from disk on an offline host and cannot leak where it is
opened. The table is sorted by reclaimable bytes on the server; the inline script
only re-sorts it on a click, so it works without JavaScript.

Chart elements carry their data (``data-t``, ``data-allocated``, ``data-used``,
``data-reclaimed``) so that a browser test can check the DOM against the history.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from vmtrim import __version__
from vmtrim.history.store import History
from vmtrim.output import human_bytes
from vmtrim.report.state import DiskState, RunPoint, disk_states, domain_series, run_points

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)
WIDTH, HEIGHT, PAD = 720, 220, 48
SPARK_W, SPARK_H = 240, 40


@dataclass(frozen=True)
class Summary:
    disks: int
    domains: int
    virtual: int
    allocated: int
    guest_used: int
    reclaimable: int
    reclaimed: int


def summarise(states: Sequence[DiskState], runs: Sequence[RunPoint]) -> Summary:
    def total(values: Iterable[int | None]) -> int:
        return sum(v for v in values if v is not None)

    return Summary(
        disks=len(states),
        domains=len({(s.host, s.domain) for s in states}),
        virtual=total(s.virtual for s in states),
        allocated=total(s.allocated for s in states),
        guest_used=total(s.guest_used for s in states),
        reclaimable=total(max(s.reclaimable, 0) if s.reclaimable else 0 for s in states),
        reclaimed=sum(r.reclaimed for r in runs),
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def _scale(lo: float, hi: float, size: float, pad: float) -> tuple[float, float]:
    span = hi - lo or 1.0
    return (size - 2 * pad) / span, lo


def _svg_open(chart_id: str) -> str:
    """An SVG chart's opening tag and its time axis."""
    base = HEIGHT - PAD
    return (
        f'<svg id="{_e(chart_id)}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}"'
        f' width="{WIDTH}" height="{HEIGHT}" role="img">'
        f'<line class="axis" x1="{PAD}" y1="{base}" x2="{WIDTH - PAD}" y2="{base}"/>'
    )


def line_chart(
    series: Sequence[tuple[float, int, int, int]],
    chart_id: str,
    before: Sequence[int] | None = None,
) -> str:
    """Allocated (line) and guest-used (dashed) over time, trims marked with a tick.

    With ``before`` (each point's allocation before its trims) the line drops at each
    trim from before to after, so the space that came back is visible as a step.
    """
    if not series:
        return f'<p id="{_e(chart_id)}" class="empty">No results in this period.</p>'
    t0, t1 = series[0][0], series[-1][0]
    before = list(before) if before is not None else [a for _, a, _, _ in series]
    top = max(max(a, u, b) for (_, a, u, _), b in zip(series, before, strict=True)) or 1
    sx, _ = _scale(t0, t1, WIDTH, PAD)
    sy = (HEIGHT - 2 * PAD) / top

    def xy(t: float, v: int) -> str:
        return f"{PAD + (t - t0) * sx:.1f},{HEIGHT - PAD - v * sy:.1f}"

    allocated = " ".join(
        f"{xy(t, b)} {xy(t, a)}" for (t, a, _, _), b in zip(series, before, strict=True)
    )
    used = " ".join(xy(t, u) for t, _, u, _ in series)
    points = "".join(
        f'<circle class="point" r="3" cx="{xy(t, a).split(",")[0]}" cy="{xy(t, a).split(",")[1]}"'
        f' data-t="{t:.3f}" data-allocated="{a}" data-used="{u}" data-reclaimed="{r}">'
        f"<title>{_e(_day(t))}: allocated {_e(human_bytes(a))}, guest used "
        f"{_e(human_bytes(u))}, reclaimed {_e(human_bytes(r))}</title></circle>"
        for t, a, u, r in series
    )
    trims = "".join(
        f'<line class="trim" x1="{xy(t, 0).split(",")[0]}" x2="{xy(t, 0).split(",")[0]}"'
        f' y1="{HEIGHT - PAD}" y2="{HEIGHT - PAD + 6}"/>'
        for t, _, _, r in series
        if r > 0
    )
    return (
        f"{_svg_open(chart_id)}"
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>'
        f'<text x="{PAD}" y="{PAD - 8}">{_e(human_bytes(top))}</text>'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 20}">{_e(_day(t0))}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 20}" text-anchor="end">{_e(_day(t1))}</text>'
        f'<polyline class="allocated" points="{allocated}"/>'
        f'<polyline class="used" points="{used}"/>{trims}{points}</svg>'
    )


def bar_chart(series: Sequence[tuple[float, int, int, int]], chart_id: str) -> str:
    """Reclaimed bytes per run."""
    if not series:
        return f'<p id="{_e(chart_id)}" class="empty">No runs in this period.</p>'
    top = max(r for *_, r in series) or 1
    step = (WIDTH - 2 * PAD) / len(series)
    bars = "".join(
        f'<rect class="bar" x="{PAD + i * step:.1f}" width="{max(step - 1, 0.5):.1f}"'
        f' y="{HEIGHT - PAD - r * (HEIGHT - 2 * PAD) / top:.1f}"'
        f' height="{r * (HEIGHT - 2 * PAD) / top:.1f}" data-t="{t:.3f}" data-reclaimed="{r}">'
        f"<title>{_e(_day(t))}: {_e(human_bytes(r))}</title></rect>"
        for i, (t, _, _, r) in enumerate(series)
    )
    return (
        f"{_svg_open(chart_id)}"
        f'<text x="{PAD}" y="{PAD - 8}">{_e(human_bytes(top))}</text>{bars}</svg>'
    )


def sparkline(points: Sequence[tuple[float, int, int]]) -> str:
    """A domain's allocation over time, small enough for a table cell; trims as dots."""
    if not points:
        return ""
    t0, t1 = points[0][0], points[-1][0]
    top = max(a for _, a, _ in points) or 1
    sx = (SPARK_W - 4) / ((t1 - t0) or 1.0)
    sy = (SPARK_H - 4) / top
    xy = [(2 + (t - t0) * sx, SPARK_H - 2 - a * sy, r) for t, a, r in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy)
    dots = "".join(
        f'<circle class="trim" r="1.5" cx="{x:.1f}" cy="{y:.1f}"/>' for x, y, r in xy if r
    )
    return (
        f'<svg class="spark" width="{SPARK_W}" height="{SPARK_H}" data-points="{len(points)}">'
        f'<polyline points="{line}"/>{dots}</svg>'
    )


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}
.summary{display:flex;gap:1.5em;flex-wrap:wrap}.summary div{border:1px solid #ccc;padding:.6em 1em}
.summary b{display:block;font-size:1.3em}
svg.chart text{font-size:11px;fill:#555}.axis{stroke:#999}
polyline{fill:none;stroke-width:1.5}.allocated{stroke:#c0392b}
.used{stroke:#2471a3;stroke-dasharray:4 3}
.point{fill:#c0392b}.trim{stroke:#27ae60;fill:#27ae60;stroke-width:2}.bar{fill:#27ae60}
.spark polyline{stroke:#c0392b}
table{border-collapse:collapse;margin-top:.5em}
th,td{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
th{cursor:pointer;background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.legend span{margin-right:1.5em}.muted{color:#777}
"""

SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var num = th.dataset.sort === 'num', dir = th.dataset.dir === 'asc' ? -1 : 1;
    th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      return (num ? (Number(x) - Number(y)) : x.localeCompare(y)) * dir;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _num(value: int | None) -> str:
    return (
        f'<td class="n" data-v="{value if value is not None else -1}">{_e(human_bytes(value))}</td>'
    )


def render_report(history: History, since: float | None = None, now: float | None = None) -> str:
    """The whole HTML document for the fleet's results since ``since`` (UNIX seconds)."""
    now = time.time() if now is None else now
    states = disk_states(history)
    runs = run_points(history, since)
    summary = summarise(states, runs)
    fleet = [(r.started, r.allocated, r.guest_used, r.reclaimed) for r in runs]
    before = [r.allocated_before for r in runs]
    by_domain = domain_series(history, since, now)
    wasters = sorted(states, key=lambda s: -(s.reclaimable or 0))
    blocked = [s for s in states if s.verdict == "block"]
    period = f"since {_day(since)}" if since is not None else "all recorded time"
    rows = "".join(
        f"<tr><td>{_e(s.host)}</td><td>{_e(s.domain)}</td><td>{_e(s.target)}</td>"
        f'<td class="muted">{_e(s.source)}</td>{_num(s.reclaimable)}{_num(s.allocated)}'
        f"{_num(s.guest_used)}{_num(s.virtual)}{_num(s.reclaimed_total)}"
        f"<td>{sparkline(by_domain.get(s.domain, []))}</td></tr>"
        for s in wasters
    )
    blocked_rows = "".join(
        f"<tr><td>{_e(s.host)}</td><td>{_e(s.domain)}</td><td>{_e(s.target)}</td>"
        f"<td>{_e(s.layer or '')}</td><td>{_e(s.reason or '')}</td>"
        f"<td><code>vmtrim audit -c URI {_e(s.domain)}</code> then "
        f"<code>vmtrim fix -c URI {_e(s.domain)} --dry-run</code></td></tr>"
        for s in blocked
    )
    blocked_table = (
        '<table id="blocked"><thead><tr><th>host</th><th>domain</th><th>disk</th>'
        f"<th>layer</th><th>reason</th><th>fix</th></tr></thead><tbody>{blocked_rows}"
        "</tbody></table>"
        if blocked
        else '<p id="blocked">None: every recorded disk lets discards through.</p>'
    )
    cards = "".join(
        f'<div id="sum-{key}" data-v="{value}">{_e(label)}<b>{_e(human_bytes(value))}</b></div>'
        for key, label, value in (
            ("virtual", "virtual", summary.virtual),
            ("allocated", "allocated on the host", summary.allocated),
            ("guest_used", "used in the guests", summary.guest_used),
            ("reclaimable", "still reclaimable (estimate)", summary.reclaimable),
            ("reclaimed", f"reclaimed, {period}", summary.reclaimed),
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vmtrim report</title><style>{STYLE}</style></head>
<body>
<h1>vmtrim report</h1>
<p class="muted">{summary.domains} domains, {summary.disks} disks, {_e(period)};
written {_e(datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M UTC"))} by vmtrim
{_e(__version__)}. Guest figures are what the guests' agents reported; allocation and
reclaimed bytes are what the host measured.</p>
<section class="summary" id="summary">{cards}</section>
<h2>Allocated vs used in the guests, whole fleet</h2>
<p class="legend"><span style="color:#c0392b">— allocated on the host</span>
<span style="color:#2471a3">- - used in the guests</span>
<span style="color:#27ae60">| a trim that gave space back</span></p>
{line_chart(fleet, "fleet-chart", before)}
<h2>Reclaimed per run</h2>
{bar_chart(fleet, "reclaimed-chart")}
<h2>Top wasters</h2>
<p class="muted">Sorted by what a trim could still give back; click a heading to sort.</p>
<table class="sortable" id="wasters"><thead><tr><th>host</th><th>domain</th><th>disk</th>
<th>source</th><th data-sort="num">reclaimable</th><th data-sort="num">allocated</th>
<th data-sort="num">guest used</th><th data-sort="num">virtual</th>
<th data-sort="num">reclaimed in all</th><th>allocation over time</th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Disks whose discard path is blocked</h2>
{blocked_table}
<script>{SCRIPT}</script>
</body></html>
"""
