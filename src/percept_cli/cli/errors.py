"""The one place that maps exceptions to a one-line message and an exit code.

Known errors (:class:`PerceptError`) print ``error: <message>. <hint>`` on stderr; advice
naming an option (``option_hints``) is added only on commands that have that option. With
``--json`` the same error also goes to stdout as one JSON document
(``{"error", "hint", "exit_code", "type"}``) so scripts can parse failures.
Anything else is a bug: one line plus how to get the traceback (``PERCEPT_DEBUG=1``).
"""

from __future__ import annotations

import functools
import os
import sys

import typer

from ..errors import EXIT_INTERNAL, PerceptError, join_sentences
from .output import print_error_document, stdout_closed

EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    return os.environ.get("PERCEPT_DEBUG", "").strip().lower() not in {"", "0", "false", "no"}


def _say(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()


def command_options(kwargs: dict) -> set[str]:
    """The long options a command has, from its keyword arguments (``skip_bad`` -> ``--skip-bad``)."""
    return {"--" + name.replace("_", "-") for name in kwargs}


def error_hint(exc: PerceptError, options: set[str]) -> str | None:
    """The error's hint plus the option hints that apply to a command with ``options``."""
    applicable = [text for option, text in exc.option_hints.items() if option in options]
    return join_sentences(exc.hint, *applicable) or None


def _fail(message: str, hint: str | None, exit_code: int, kind: str, json_mode: bool, prefix: str | None = "error"):
    line = join_sentences(message, hint)
    _say(f"{prefix}: {line}" if prefix else line)
    if json_mode:
        print_error_document(message, hint, exit_code, kind)
    raise typer.Exit(exit_code)


def resume_hint(kwargs: dict) -> str:
    """How to go on after Ctrl-C: ``--resume FILE`` where the command has saved resumable work."""
    if "save_every" in kwargs:  # percept train: checkpoints are in the run directory
        return "Checkpoints are kept; rerun the same command with --resume to continue from the last one."
    if "faiss_kind" in kwargs:  # retrieve index / add: finished parts stay on disk
        return "Finished parts are kept; rerun the same command to continue from them."
    if isinstance(kwargs.get("resume"), bool):  # retrieve filter: --resume is a flag, the report holds the chunks
        from ..retrieval.reports import partial_folder

        report = kwargs.get("report")
        if report is not None and partial_folder(report).exists():
            return "Rerun the same command with --resume to continue from the finished chunks."
        return "Nothing was saved yet; rerun the command to start again."
    if "resume" not in kwargs:
        return "Nothing was saved; rerun the command to start again."
    target = kwargs.get("out") or kwargs.get("resume")
    if target is None:
        return "Nothing was saved (no --out); rerun it, with --out FILE to be able to resume."
    from pathlib import Path

    from ..evaluation.results import partial_path

    if Path(target).exists() or partial_path(Path(target), 0).exists():
        return f"Rerun the same command with --resume {target} to continue."
    return "Nothing was flushed yet; rerun the command to start again."


def handle_errors(command):
    """Decorator for Typer commands: known errors -> one line + exit code, never a traceback.

    Whether ``--json`` was given is read from the command's ``json`` keyword argument.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        json_mode = bool(kwargs.get("json"))
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BrokenPipeError:  # stdout's reader went away (`| head`): not an error
            stdout_closed()
        except PerceptError as exc:
            if debug_enabled():
                raise
            _fail(exc.message, error_hint(exc, command_options(kwargs)), exc.exit_code, type(exc).__name__,
                  json_mode)
        except KeyboardInterrupt:
            _fail("interrupted.", resume_hint(kwargs), EXIT_INTERRUPTED, "interrupted", json_mode, prefix=None)
        except Exception as exc:  # last-resort net: a bug, reported in one line unless debugging
            if debug_enabled():
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"{type(exc).__name__}: {first_line}",
                  "Set PERCEPT_DEBUG=1 for the traceback and please report it.", EXIT_INTERNAL, "internal",
                  json_mode, prefix="internal error")

    return wrapper
