"""``percept models list|info|download``: the zoo, and model files in the Hugging Face cache."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Optional

import typer

from .command import PerceptCommand, PerceptGroup
from .errors import handle_errors
from .options import CheckpointOpt, JsonOpt, QuietOpt
from .output import Output

app = typer.Typer(help="List the model zoo, inspect and download models.", no_args_is_help=True, cls=PerceptGroup)

NameArg = Annotated[str, typer.Argument(help="Zoo name, hf-hub:ORG/NAME\\[@REV] or a local model directory.")]


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


@app.command("list", cls=PerceptCommand)
@handle_errors
def list_command(json: JsonOpt = False) -> None:
    """The named models, with the NIGHTS 2AFC accuracy their authors report."""
    from ..models.zoo import DEFAULT_MODEL, list_models

    specs = list_models()
    payload = {"default": DEFAULT_MODEL,
               "models": [{**asdict(s), "image_size": s.image_size, "nights": asdict(s.nights),
                           "aliases": list(s.aliases), "published": [asdict(r) for r in s.published]}
                          for s in specs]}

    def render(console):
        from rich.table import Table

        console.print("percept model zoo (NIGHTS 2AFC %: clean / l_inf 4/255 / l2 3)", markup=False, soft_wrap=True)
        table = Table(header_style="bold")
        for col, kw in (("name", {"no_wrap": True}), ("metric", {}), ("backbone", {"no_wrap": True}),
                        ("robust FT", {"no_wrap": True}),
                        ("clean", {"justify": "right"}), ("l_inf", {"justify": "right"}),
                        ("l2", {"justify": "right"}), ("source", {"overflow": "fold"})):
            table.add_column(col, **kw)
        for s in specs:
            name = f"{s.name} (default)" if s.name == DEFAULT_MODEL else s.name
            ft = "–" if s.method == "none" else f"{s.method} {s.threat.replace('l_inf ', '')}"
            table.add_row(name, s.label, s.backbone, ft, _pct(s.nights.clean), _pct(s.nights.linf),
                          _pct(s.nights.l2), s.source)
        console.print(table)
        console.print("– : no number published. Sources of each number: docs/models.md.", style="dim")

    Output(json).result(payload, render)


@app.command("info", cls=PerceptCommand)
@handle_errors
def info_command(name: NameArg, checkpoint: CheckpointOpt = None, json: JsonOpt = False) -> None:
    """Source, resolved revision and cache path of a model (never downloads), and its published numbers."""
    from ..models.loading import describe_model
    from ..models.zoo import find_spec

    info = describe_model(name, checkpoint)
    spec = find_spec(info["zoo"]) if info.get("zoo") else None
    info["published"] = [asdict(r) for r in spec.published] if spec else []

    def render(console):
        from rich.table import Table

        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key in ("name", "zoo", "label", "backbone", "method", "source", "family", "requested_revision",
                    "present", "revision", "path", "config", "weights", "cache_dir", "preprocess", "pooling",
                    "fine_tuned"):
            if info.get(key) is not None:
                table.add_row(key, _preprocess_text(info[key]) if key == "preprocess" else str(info[key]))
        console.print(table)
        if info["zoo"]:
            _render_published(console, info["published"])
        if not info["present"]:
            console.print(f"not cached: run `percept models download {name}` on a connected machine.")

    Output(json).result(info, render)


def _render_published(console, published: list[dict]) -> None:
    """The published numbers of a zoo entry, with where each was read."""
    from rich.table import Table

    from ..models.zoo import SOURCES

    if not published:
        console.print("published numbers: none found (see docs/models.md).")
        return
    table = Table(title="published numbers (%)", header_style="bold", title_justify="left")
    for col, kw in (("benchmark", {"no_wrap": True}), ("threat", {"no_wrap": True}),
                    ("value", {"justify": "right"}), ("source", {})):
        table.add_column(col, **kw)
    for r in published:
        table.add_row(r["benchmark"], r["threat"], _pct(r["value"]), r["source"])
    console.print(table)
    for source in sorted({r["source"] for r in published} & set(SOURCES)):
        console.print(f"{source}: {SOURCES[source]}", style="dim")


@app.command("download", cls=PerceptCommand)
@handle_errors
def download_command(name: NameArg, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Fetch a model into the Hugging Face cache ahead of time (honours HF_HOME / HF_HUB_CACHE)."""
    from ..errors import ModelUnavailableError
    from ..models.loading import download_model

    output = Output(json, quiet)
    if quiet or json:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        files = download_model(name)
    except ModelUnavailableError as exc:
        if exc.hint is None:  # e.g. a gated repo: the message already says what to do
            raise
        raise ModelUnavailableError(exc.message, _download_failed_hint(name)) from None
    payload = {"name": name, "repo_id": files.repo_id, "revision": files.revision, "path": str(files.root),
               "files": [p.name for p in (files.config_path, files.weights_path) if p]}
    output.result(payload, lambda c: c.print(f"{name}: {files.repo_id}@{files.revision} in {files.root}"))


def _download_failed_hint(name: str) -> str:
    """What to do when a download could not reach the Hub (running the same command again is not it)."""
    from ..models.hub import hub_offline

    if hub_offline():
        return ("HF_HUB_OFFLINE is set, so the Hub is never contacted: unset it (or set it to 0) to download, "
                "or copy a Hugging Face cache holding the model and point HF_HUB_CACHE or HF_HOME at it.")
    return (f"Check the network connection (proxy: HTTPS_PROXY; mirror: HF_ENDPOINT) and that '{name}' is the "
            "right id (`percept models list`), or copy a Hugging Face cache from a connected machine and point "
            "HF_HUB_CACHE or HF_HOME at it.")


def _preprocess_text(pre: dict) -> str:
    """``resize short side 256, center-crop 224`` from a zoo entry's resize/crop."""
    if pre.get("crop") is None:
        return f"resize to {pre['resize']}x{pre['resize']}, no crop"
    return f"resize short side {pre['resize']} (bicubic), center-crop {pre['crop']}"
