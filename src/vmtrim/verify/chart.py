"""A PNG chart of verify results: reclaim ratio per cell, against what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmtrim.errors import EnvironmentProblem

if TYPE_CHECKING:
    from vmtrim.verify.engine import CellResult


def write_chart(results: list[CellResult], host: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EnvironmentProblem(
            "--png needs matplotlib: pip install 'vmtrim[plot]'", subject=str(path)
        ) from exc
    labels = [f"{r.bus} {r.format} {r.mode} {r.discard}" for r in results]
    ratios = [100 * (r.reclaim_ratio or 0.0) for r in results]
    colours = [
        "#c0392b" if r.error or not r.ok else ("#27ae60" if r.expected == "reclaim" else "#7f8c8d")
        for r in results
    ]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(results) + 1.6))
    ys = list(range(len(results)))
    ax.barh(ys, ratios, color=colours)
    for y, r in zip(ys, results, strict=True):
        target = 100.0 if r.expected == "reclaim" else 0.0
        ax.plot([target], [y], marker="|", color="black", markersize=10)
        note = "error" if r.error else ("ok" if r.ok else "MISMATCH")
        ax.text(min(ratios[y], 100) + 1, y, note, va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 115)
    ax.set_xlabel("bytes reclaimed on the host, % of bytes deleted (| = expected)")
    ax.set_title(
        f"vmtrim verify: QEMU {host.get('qemu_version')}, {host.get('machine')}, "
        f"guest {host.get('guest_kernel')}, {host.get('accel')}",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot write the chart: {exc.strerror}", subject=str(path)
        ) from exc
    finally:
        plt.close(fig)
