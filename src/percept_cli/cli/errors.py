"""The one place that maps exceptions to a one-line message and an exit code.

Known errors (:class:`PerceptError`) print ``error: <message> <hint>`` on stderr.
Anything else is a bug: one line plus how to get the traceback
(``PERCEPT_DEBUG=1``), which then shows in full.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

from ..errors import EXIT_INTERNAL, PerceptError

EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    return os.environ.get("PERCEPT_DEBUG", "").strip().lower() not in {"", "0", "false", "no"}


def _say(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()


def handle_errors(command):
    """Decorator for Typer commands: known errors -> one line + exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except PerceptError as exc:
            if debug_enabled():
                raise
            _say(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _say("interrupted.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # last-resort net: a bug, reported in one line unless debugging
            if debug_enabled():
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _say(f"internal error: {type(exc).__name__}: {first_line} "
                 "(set PERCEPT_DEBUG=1 for the traceback and please report it).")
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper
