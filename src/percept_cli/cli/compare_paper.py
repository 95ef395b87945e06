"""``percept compare-paper RESULTS.json``: our eval-2afc numbers beside the published ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import handle_errors
from .options import JsonOpt, QuietOpt
from .output import Output

HELP = """Put the numbers of an eval-2afc results file beside those published for the zoo models.

\b
  percept eval-2afc --dataset nights --root NIGHTS_DIR --attack linf -m rclip-f --out r.json
  percept compare-paper r.json
  percept compare-paper r.json --json

Matches each model by its zoo entry, the dataset (NIGHTS split, BAPPS subset), the threat model and
the radius. Difference = ours - paper, in points. "–": nothing published for that row.
"""


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _render(console, report: dict) -> None:
    from rich.table import Table

    console.print(f"{report['dataset']} {report['split'] or ''} ({report['n_triplets']} triplets): "
                  "ours vs published (%)")
    table = Table(header_style="bold")
    for col, kw in (("model", {"no_wrap": True}), ("benchmark", {"no_wrap": True}), ("threat", {"no_wrap": True}),
                    ("ours", {"justify": "right"}), ("paper", {"justify": "right"}),
                    ("diff", {"justify": "right"}), ("source", {})):
        table.add_column(col, **kw)
    for model in report["models"]:
        if not model["rows"]:
            table.add_row(model["name"], "–", "–", "–", "–", "–", "unfinished run" if model["status"] != "complete"
                          else "")
        for row in model["rows"]:
            table.add_row(model["name"], row["benchmark"], row["threat"], _fmt(row["ours"]), _fmt(row["paper"]),
                          _fmt(row["diff"], signed=True), row["source"] or "")
    console.print(table)
    console.print("Sources: docs/models.md. Models given as hf-hub:/directories have no published numbers.",
                  style="dim")


@handle_errors
def compare_paper(
    results: Annotated[Path, typer.Argument(help="A results file written by `percept eval-2afc --out`.",
                                            show_default=False)],
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from ..evaluation.paper import compare_with_paper, load_results

    report = compare_with_paper(load_results(results))
    Output(json, quiet).result({"results": str(results), **report}, lambda console: _render(console, report))
