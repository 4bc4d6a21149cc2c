"""Progress bars on stderr: the count bar (``count_progress``, also ``vmtrim trim``'s), and the
fleet's two: hosts done of all, domains done of those found so far."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported lazily, when a bar is made
    from rich.progress import Progress


def count_progress(label: str, *, show: bool = True) -> Progress:
    """The count bar on stderr: ``label``, the bar, done of total, the time elapsed, then
    the task's description (plain text, never markup). Shown on a terminal only, and not
    when ``show`` is false or with --quiet."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from vmtrim.output import progress_console

    err = progress_console()
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}", markup=False),
        console=err,
        transient=True,
        disable=not (show and err.is_terminal),
    )


class FleetProgress:
    """Two bars on stderr (terminal only, not with --quiet); safe to update from any thread."""

    def __init__(self, command: str, hosts: int, *, show: bool = True) -> None:
        self._progress = count_progress(command + " {task.fields[what]}", show=show)
        self._hosts = self._progress.add_task("", total=hosts, what="hosts  ")
        self._domains = self._progress.add_task("", total=0, what="domains")
        self._lock = threading.Lock()
        self._found = 0

    def __enter__(self) -> FleetProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(kind, value, tb)

    def found(self, domains: int) -> None:
        """A host listed its domains: they join the domains' total."""
        with self._lock:
            self._found += domains
            self._progress.update(self._domains, total=self._found)

    def domain_done(self, text: str) -> None:
        from vmtrim.output import safe_text

        self._progress.update(self._domains, advance=1, description=safe_text(text))

    def host_done(self, run: Any) -> None:
        from vmtrim.output import safe_text

        status = "failed" if run.error else "done"
        self._progress.update(self._hosts, advance=1, description=safe_text(f"{run.uri}: {status}"))
