"""Rendering helpers shared by the commands: JSON documents, rich consoles, sizes."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported lazily: `vmtrim image info --json` never needs it
    from rich.console import Console


def json_document(schema: str, body: dict[str, Any]) -> dict[str, Any]:
    """Return ``body`` with the ``"schema": "vmtrim.<command>/<n>"`` field first."""
    return {"schema": schema, **body}


def print_json(schema: str, body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(json_document(schema, body), indent=2, sort_keys=False) + "\n")


def color_allowed(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(
        file=stream,
        no_color=not color_allowed(stream),
        highlight=False,
        soft_wrap=not color_allowed(stream),
    )


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'. Exact bytes belong in JSON; this is for tables."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
