"""Run a host tool and turn its failure into one :class:`EnvironmentProblem` line."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from vmtrim.errors import EnvironmentProblem


def run_tool(
    argv: Sequence[str],
    *,
    subject: str | None = None,
    timeout: float = 300.0,
    cwd: str | None = None,
    stdin_bytes: bytes | None = None,
) -> str:
    """Run ``argv``; return its stdout as text, or raise with the last stderr line."""
    try:
        result = subprocess.run(
            list(argv),
            input=stdin_bytes,
            capture_output=True,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"{argv[0]} is not installed", subject=subject) from exc
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentProblem(
            f"{argv[0]} did not finish within {timeout:.0f} s", subject=subject
        ) from exc
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        tail = lines[-1] if lines else f"exit status {result.returncode}"
        raise EnvironmentProblem(f"{' '.join(argv[:3])} failed: {tail}", subject=subject)
    return result.stdout.decode(errors="replace")
