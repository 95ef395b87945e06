"""All terminal output goes through one :class:`Output` object.

* Results: rich tables/lines on stdout, or with ``--json`` exactly one JSON document on stdout.
* Progress bars, status and warnings: stderr only, and progress only when stderr is a terminal
  (and not ``--quiet``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Callable, Iterator

from rich.console import Console


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def stdout_closed() -> None:
    """The reader of stdout went away (``percept models list | head -1``): exit 0 quietly, as Unix tools do.

    stdout is pointed at /dev/null first so that Python's flush at exit does not fail a second time.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test runner's buffer): nothing to redirect
        pass
    raise SystemExit(0)


class _Console(Console):
    """rich's Console, but a closed pipe ends the program with 0 rather than rich's 1."""

    def on_broken_pipe(self) -> None:
        stdout_closed()


class Output:
    """Where a command's results, progress and warnings go.

    Args:
        json_mode: print results as one JSON document on stdout.
        quiet: no progress or informational messages on stderr (warnings about skipped
            inputs and errors still appear).
    """

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        # piped stdout is not squeezed into 80 columns: tables stay one row per line
        self.out = _Console(highlight=False, width=None if sys.stdout.isatty() else 200)
        self.err = _Console(stderr=True, highlight=False)

    @property
    def interactive(self) -> bool:
        """Progress displays are shown only to a person watching stderr."""
        return (not self.quiet) and sys.stderr.isatty()

    def result(self, payload: dict, render: Callable[[Console], None]) -> None:
        """Emit the command's result: ``payload`` as JSON, or ``render(stdout_console)``."""
        if self.json_mode:
            sys.stdout.write(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()
        else:
            render(self.out)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}", markup=True)

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner on stderr while something slow happens (loading a model)."""
        if not self.interactive:
            yield
            return
        with self.err.status(message):
            yield

    @contextlib.contextmanager
    def progress(self, total: int, description: str) -> Iterator[Callable[..., None]]:
        """A rich progress bar on stderr; yields ``advance(n, text=None)`` (text replaces the label).

        A no-op when not interactive.
        """
        if not self.interactive or total <= 0:
            yield lambda n, text=None: None
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int, text: str | None = None) -> None:
                bar.update(task, advance=n, **({"description": text} if text else {}))

            yield advance


def print_error_document(error: str, hint: str | None, exit_code: int, kind: str) -> None:
    """``--json`` mode's answer to a failure: one JSON document on stdout (the human line is on stderr)."""
    document = {"error": error, "hint": hint, "exit_code": exit_code, "type": kind}
    try:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # nobody is reading stdout (closed pipe or stream)
        pass
