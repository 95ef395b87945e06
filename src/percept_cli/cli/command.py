"""Command classes that keep ``--help`` plain: ``--out OUT``, flags without a type, ``IMAGE`` not ``{image}``;
and with ``--json`` a command-line error is one JSON document on stdout, as other errors are (cli/errors.py).

Recent Typer versions print each parameter's Python type (``<bool>`` after every flag,
``<list[str]>``, ``{image}`` in the usage line). percept's commands use these classes
(``typer.Typer(cls=PerceptGroup)``, ``app.command(cls=PerceptCommand)``) so that help shows
upper-case placeholders instead. Only public Click names are used (``get_params``,
``collect_usage_pieces``, ``metavar``), and an explicit ``metavar=`` always wins.
"""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup

_PLAIN_ARGUMENT_CLASSES: dict[type, type] = {}


def _placeholder(param) -> str:
    """``--batch-size`` -> ``BATCH_SIZE``; an argument ``image`` -> ``IMAGE``."""
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    name = longs[0][2:] if longs else (param.name or "value")
    return name.replace("-", "_").upper()


def _plain_argument_class(cls: type) -> type:
    """``cls`` with the type column of help left empty (the name says what to pass)."""
    if cls not in _PLAIN_ARGUMENT_CLASSES:
        _PLAIN_ARGUMENT_CLASSES[cls] = type(cls.__name__, (cls,), {"display_type_rich": lambda self, ctx: None})
    return _PLAIN_ARGUMENT_CLASSES[cls]


def tidy_params(params: list) -> list:
    """Give every parameter a plain placeholder (in place) and return ``params``."""
    for param in params:
        if getattr(param, "param_type_name", "") == "argument":
            if param.metavar is None:
                param.metavar = _placeholder(param)
            if hasattr(param, "display_type_rich") and type(param) not in _PLAIN_ARGUMENT_CLASSES.values():
                param.__class__ = _plain_argument_class(type(param))
        elif param.metavar is None:
            param.metavar = "" if getattr(param, "is_flag", False) or getattr(param, "count", False) \
                else _placeholder(param)
    return params


def _usage_piece(param) -> str:
    """``IMAGE``, ``[NAME]``, ``INPUTS...`` or ``[INPUTS]...`` for the usage line."""
    name = param.metavar or _placeholder(param)
    piece = name if param.required else f"[{name}]"
    return piece + ("..." if param.nargs != 1 else "")


class PerceptCommand(TyperCommand):
    """A Typer command whose help shows placeholders, not Python types, and whose command-line errors
    (a missing option, a value of the wrong type) also come as a JSON document on stdout with ``--json``."""

    def get_params(self, ctx):
        return tidy_params(super().get_params(ctx))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        json_mode = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:  # Click's usage errors; Typer then prints the human message and exits
            if json_mode and hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
                from .output import print_error_document

                print_error_document(exc.format_message(), f"See '{ctx.command_path} --help'.", exc.exit_code,
                                     "UsageError")
            raise

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_usage_piece(p) for p in self.get_params(ctx)
                         if getattr(p, "param_type_name", "") == "argument"]


class PerceptGroup(TyperGroup):
    """A Typer group with the same plain help (``--version``, ``--help`` without ``<bool>``)."""

    def get_params(self, ctx):
        return tidy_params(super().get_params(ctx))
