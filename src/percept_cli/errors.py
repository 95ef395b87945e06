"""Exceptions that percept raises on purpose.

Every error a user can cause or fix is a :class:`PerceptError` with a one-line
message and, where useful, a hint. The CLI maps these to one line on stderr and
an exit code; anything else is a bug and shows a traceback only on request.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


class PerceptError(Exception):
    """Base class: a known failure with a user-facing message.

    Args:
        message: one sentence saying what is wrong (and naming the file or value).
        hint: optional second sentence saying what to do about it.
        option_hints: advice that names a command-line option, ``{"--skip-bad": "Use --skip-bad to
            skip unreadable files."}``; the CLI shows each only on commands that have the option,
            and ``str(error)`` (what library users see) leaves them out.
    """

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None, *, option_hints: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.option_hints = dict(option_hints or {})

    def __str__(self) -> str:
        return join_sentences(self.message, self.hint)


def join_sentences(*parts: str | None) -> str:
    """``"a.png: file not found"`` + ``"Use X."`` -> ``"a.png: file not found. Use X."`` (Nones skipped)."""
    kept = [p.strip() for p in parts if p and p.strip()]
    return " ".join(p + "." if k < len(kept) - 1 and p[-1] not in ".!?:" else p for k, p in enumerate(kept))


class BadInputError(PerceptError, ValueError):
    """The user's input (a value, a file, a name) cannot be used."""

    exit_code = EXIT_BAD_INPUT


class ImageReadError(BadInputError):
    """An image file is missing, unreadable or unsupported.

    Attributes:
        path: the offending file.
    """

    def __init__(self, path, reason: str, hint: str | None = None, *, option_hints: dict[str, str] | None = None):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}", hint, option_hints=option_hints)


class UnknownModelError(BadInputError):
    """A model name that is neither in the zoo nor a valid source."""


class ModelUnavailableError(PerceptError):
    """The model exists but its files cannot be had (not cached, offline)."""

    exit_code = EXIT_UNAVAILABLE


class ModelFormatError(BadInputError):
    """A local model directory or checkpoint is not in a format percept reads."""
