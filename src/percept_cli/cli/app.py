"""The ``percept`` command: this file only assembles the subcommands.

Each subcommand lives in its own module, parses its options, calls one library
function and renders. No heavy import (torch, open_clip) happens here, so
``percept --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from . import attack, compare_paper, distance, embed, eval_2afc, invert, models, retrieve, train
from .command import PerceptCommand, PerceptGroup
from .output import stdout_closed

app = typer.Typer(
    name="percept",
    cls=PerceptGroup,
    help="Robust perceptual distance from adversarially robust CLIP/DINO encoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"percept {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Show the version and exit.")] = None) -> None:
    """Robust perceptual distance from adversarially robust CLIP/DINO encoders."""


app.command("distance", help=distance.HELP, no_args_is_help=False, cls=PerceptCommand)(distance.distance)
app.command("embed", help=embed.HELP, cls=PerceptCommand)(embed.embed_command)
app.add_typer(attack.app, name="attack")
app.command("eval-2afc", help=eval_2afc.HELP, cls=PerceptCommand)(eval_2afc.eval_2afc)
app.command("compare-paper", help=compare_paper.HELP, cls=PerceptCommand)(compare_paper.compare_paper)
app.command("invert", help=invert.HELP, cls=PerceptCommand)(invert.invert_command)
app.add_typer(retrieve.app, name="retrieve")
app.add_typer(train.app, name="train")
app.add_typer(models.app, name="models")


def main() -> None:
    """Console-script entry point; a closed stdout (``percept models list | head -1``) ends quietly with 0."""
    try:
        app()
    except BrokenPipeError:
        stdout_closed()


if __name__ == "__main__":
    main()
