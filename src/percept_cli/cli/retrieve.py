"""``percept retrieve index|add|search|classify|filter|dedup|map``: robust image-to-image retrieval.

Each command validates its options and inputs before any model work, calls the library
(:mod:`percept_cli.retrieval`) and renders. Commands that read an index load the index's own model
(and its preprocessing) unless ``--model`` names one, which must then be the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .command import PerceptCommand, PerceptGroup
from .errors import handle_errors
from .options import (BatchSizeOpt, CheckpointOpt, HeadOpt, LoraOpt, Common, CompileOpt, CropOpt, DeviceOpt, DtypeOpt, EpsOpt,
                      ForceOpt, ItersOpt, JsonOpt, PoolingOpt, QuietOpt, RandomStartOpt, ResizeOpt, RestartsOpt,
                      SeedOpt, WorkersOpt, attack_settings, threat_dict)
from .output import Output

app = typer.Typer(help="Robust image-to-image retrieval: index a labelled pool, then search it, classify or filter "
                  "images by their nearest pool items, find near-duplicates and measure mAP, clean and under "
                  "attack.", no_args_is_help=True, cls=PerceptGroup)

IndexOpt = Annotated[Path, typer.Option("--index", "-i", help="The index folder (percept retrieve index).",
                                        show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default=False, rich_help_panel="Model",
    help="Model name, hf-hub:ORG/NAME\\[@REV] or folder (default: the index's model; another one is refused).")]
LabelsOpt = Annotated[str, typer.Option(
    "--labels", help="folder: each image's first-level subfolder (pool/safe/..., pool/unsafe/...); none; or a CSV "
    "with columns path,label.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto (FAISS when the index has a current one, else "
                                         "exact) | exact | faiss.")]
AttackOpt = Annotated[Optional[str], typer.Option("--attack", help="Attack the queries with APGD: linf | l2.",
                                                  rich_help_panel="Attack", show_default=False)]
SaveAdvOpt = Annotated[Optional[Path], typer.Option("--save-adv", help="Write the attacked queries here as 8-bit "
                                                    "PNG (inside the ball).", rich_help_panel="Attack")]
AttackBatchOpt = Annotated[Optional[int], typer.Option("--attack-batch-size", min=1, rich_help_panel="Attack",
                                                       show_default=False,
                                                       help="Queries attacked together (default --batch-size); "
                                                       "results do not depend on it.")]

INDEX_HELP = """Build or update an index of images (directories, list files, WebDataset shards).

\b
  percept retrieve index pool/ --out pool.idx                 labels from pool/safe, pool/unsafe, pool/buffer
  percept retrieve index shards/{00000..00099}.tar --out web.idx --labels none
  percept retrieve index list.txt --labels labels.csv --out pool.idx

Re-running on a grown or changed source embeds only new or changed files (path, size, mtime) and
drops deleted ones; an interrupted run resumes where it stopped. Under torchrun (or srun) every
process builds its own block of parts.
"""


def _common(model, device, dtype, batch_size, workers, json, quiet, seed=0, checkpoint=None, resize=None, crop=None,
            pooling=None, compile=False, head=None, lora=None) -> Common:
    from ..models.zoo import DEFAULT_MODEL

    return Common(model=model or DEFAULT_MODEL, checkpoint=checkpoint, head=head, lora=lora, device=device, dtype=dtype,
                  batch_size=batch_size, workers=workers, seed=seed, json=json, quiet=quiet, resize=resize, crop=crop,
                  pooling=pooling, compile=compile)


def _labels(labels: str) -> tuple[Optional[Path], bool]:
    """--labels / --truth: folder | none | CSV -> (labels CSV or None, label_from_folder)."""
    from ..errors import BadInputError

    text = labels.strip()
    if text.lower() == "folder":
        return None, True
    if text.lower() == "none":
        return None, False
    path = Path(text)
    if path.suffix.lower() != ".csv":
        raise BadInputError(f"--labels takes folder, none or a .csv file (path,label); got '{labels}'.")
    return path, False


def _metric_for(index, common: Common, output: Output, requested: Optional[str], device: Optional[str] = None):
    """The metric for ``index``: the index's model and preprocessing, or ``requested`` (--model), which
    must be the same model (BadInputError naming both otherwise). Without an index: --model's."""
    import dataclasses

    device = device or common.device
    if index is None:
        return dataclasses.replace(common, device=device).load_metric(output)
    recorded = index.manifest["model"]
    pre = recorded.get("preprocess") or {}
    checkpoint = Path(recorded["location"]) if recorded.get("kind") == "checkpoint" else None
    geometry = dict(resize=pre.get("resize"), crop=str(pre["crop"]) if pre.get("crop") else "none",
                    pooling=recorded.get("pooling"))
    chosen = dataclasses.replace(common, model=requested or recorded["name"], checkpoint=checkpoint, device=device,
                                 **geometry)
    metric = chosen.load_metric(output)
    index.check_model(metric)
    return metric


FAISS_KINDS = ("auto", "none", "flat", "ivf-flat", "ivf-pq")
FAISS_AUTO_MIN = 100_000  # below this, exact search is fast enough that an approximate index does not pay


def _maybe_faiss(index, kind: str, seed: int, output: Output) -> Optional[dict]:
    """Build the FAISS index when asked (auto: when faiss is installed and the index is large)."""
    if kind == "none":
        return None
    if kind == "auto":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return None
        if index.n < FAISS_AUTO_MIN:
            return None
    from ..retrieval.search import build_faiss

    with output.status("Building the FAISS index ..."):
        return build_faiss(index, kind, seed=seed)


def _build(sources, out: Path, labels: str, mode: str, part_size: Optional[int], storage_dtype: Optional[str],
           faiss_kind: str,
           common: Common, requested: Optional[str], json_out: bool) -> None:
    """index / add: list, check, load the model, build (every torchrun rank), then FAISS and the summary (rank 0)."""
    from .. import distributed
    from ..errors import BadInputError
    from ..io.outputs import check_outputs, output_folder, path_inputs
    from ..retrieval import index as pool_index
    from ..retrieval.sources import collect_items

    if storage_dtype not in (None, "float16", "float32"):
        raise BadInputError(f"--storage-dtype takes float16 or float32; got '{storage_dtype}'.")
    if faiss_kind not in FAISS_KINDS:
        raise BadInputError(f"--faiss takes {', '.join(FAISS_KINDS)}; got '{faiss_kind}'.")
    csv, from_folder = _labels(labels)
    on_disk = path_inputs([*sources, csv, requested, common.checkpoint, common.head, common.lora])
    check_outputs([output_folder("--out", out)], inputs=on_disk, input_dirs=on_disk)
    listing = collect_items(sources, labels=csv, label_from_folder=from_folder)
    existing = pool_index.open_index(out) if (out / "manifest.json").exists() else None
    dist = distributed.init(common.device)
    output = Output(json_out, common.quiet or not dist.is_main)
    try:
        metric = _metric_for(existing, common, output, requested, distributed.device_for(dist, common.device))
        for problem in listing.problems:
            output.warn(f"{problem.path}: {problem.reason}")
        prepared = pool_index.prepare_build(metric, listing, out, mode=mode, part_size=part_size,
                                            storage_dtype=storage_dtype)
        with output.progress(prepared.plan.to_embed if dist.is_main else 0, "Indexing") as advance:
            summary = pool_index.build_index(metric, listing, out, mode=mode, part_size=part_size,
                                             storage_dtype=storage_dtype, batch_size=common.batch_size,
                                             num_workers=common.workers, dist=dist, progress=advance,
                                             prepared=prepared)
        faiss_info = _maybe_faiss(pool_index.open_index(out), faiss_kind, common.seed, output) if dist.is_main else None
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return
    built = pool_index.open_index(out)
    payload = {"index": str(out), "mode": mode, "model": built.manifest["model"], **_summary_dict(summary),
               "labels": built.manifest.get("counts", {}).get("labels", {}),
               "problems": [{"path": p.path, "reason": p.reason} for p in listing.problems], "faiss": faiss_info}
    output.result(payload, lambda console: _render_build(console, payload))


def _summary_dict(summary) -> dict:
    keys = ("items", "ok", "failed", "new", "changed", "deleted", "kept", "parts_written", "parts_reused",
            "parts_total", "seconds")
    data = {k: getattr(summary, k) for k in keys}
    data["failures"] = [{"key": k, "error": e} for k, e in summary.failures]
    return data


def _render_build(console, p: dict) -> None:
    console.print(f"{p['index']}: {p['ok']} images indexed, {p['failed']} unreadable; {p['new']} new, "
                  f"{p['changed']} changed, {p['deleted']} removed, {p['kept']} unchanged; parts: {p['parts_written']} "
                  f"written, {p['parts_reused']} reused, {p['parts_total']} in all ({p['seconds']:.1f} s)",
                  markup=False)
    if p["labels"]:
        console.print("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(p["labels"].items())), markup=False)
    for failure in p["failures"][:20]:
        console.print(f"  unreadable: {failure['key']}: {failure['error']}", markup=False)
    if len(p["failures"]) > 20:
        console.print(f"  ... and {len(p['failures']) - 20} more (--json lists them all)", markup=False)
    if p["faiss"]:
        f = p["faiss"]
        console.print(f"FAISS {f.get('kind')} index ({f.get('factory')}): recall@10 {f.get('recall_at_10'):.3f} on "
                      f"{f.get('recall_queries')} held-out queries", markup=False)


@handle_errors
def index_command(
    sources: Annotated[List[str], typer.Argument(help="Image folders, image files, list files (.txt/.csv) or "
                                                 "WebDataset shards (.tar, brace patterns).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The index folder (created or updated).",
                                      show_default=False)],
    labels: LabelsOpt = "folder",
    part_size: Annotated[Optional[int], typer.Option("--part-size", min=1, show_default=False,
                                                     help="Images per part: the unit of resumption and of work per "
                                                     "process (default 4096, or the index's own).")] = None,
    storage_dtype: Annotated[Optional[str], typer.Option("--storage-dtype", show_default=False,
                                                         help="float16 | float32 (default float16, or the "
                                                         "index's own).")] = None,
    faiss_kind: Annotated[str, typer.Option("--faiss", help="auto (when faiss is installed and the index holds at "
                                            f"least {FAISS_AUTO_MIN:,} images) | none | flat | ivf-flat | "
                                            "ivf-pq.")] = "auto",
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32",
    batch_size: BatchSizeOpt = 32, workers: WorkersOpt = None, resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None, compile: CompileOpt = False, seed: SeedOpt = 0, json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    common = _common(model, device, dtype, batch_size, workers, json, quiet, seed, checkpoint, resize, crop, pooling,
                     compile, head, lora)
    _build(sources, out, labels, "sync", part_size, storage_dtype, faiss_kind.strip().lower(), common, model, json)


ADD_HELP = """Add images to an existing index (items already in it stay; changed files are re-embedded).

\b
  percept retrieve add pool.idx more_unsafe/ --labels folder
"""


@handle_errors
def add_command(
    index: Annotated[Path, typer.Argument(help="An existing index folder.", show_default=False)],
    sources: Annotated[List[str], typer.Argument(help="Images to add (as for index).", show_default=False)],
    labels: LabelsOpt = "folder",
    faiss_kind: Annotated[str, typer.Option("--faiss", help="auto | none | flat | ivf-flat | ivf-pq (built again "
                                            "after adding).")] = "auto",
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None, seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from ..retrieval.index import open_index

    open_index(index)  # exit 2 when it is not an index
    common = _common(model, device, dtype, batch_size, workers, json, quiet, seed)
    _build(sources, index, labels, "add", None, None, faiss_kind.strip().lower(), common, model, json)


# -- queries --------------------------------------------------------------------------------------------
def _open_pool(index_path: Path, backend: str):
    """(PoolIndex, backend name), checked before any model work."""
    from ..errors import BadInputError
    from ..retrieval.index import open_index

    backend = backend.strip().lower()
    if backend not in ("auto", "exact", "faiss"):
        raise BadInputError(f"--backend takes auto, exact or faiss; got '{backend}'.")
    index = open_index(index_path)
    if index.n == 0:
        raise BadInputError(f"--index {index_path}: the index holds no readable image.")
    return index, backend


def _query_session(pool, backend: str, common: Common, requested: Optional[str]):
    """(Output, the index's metric, its Searcher) for a command that queries ``pool``."""
    from ..retrieval.search import Searcher

    output = Output(common.json, common.quiet)
    metric = _metric_for(pool, common, output, requested)
    return output, metric, Searcher(pool, backend, device=metric.device)


def _query_pixels(metric, items, output: Output, keep_pixels: bool, description: str = "Embedding queries"):
    """(uint8 pixels (Q,3,S,S) on the CPU if ``keep_pixels`` else None, embeddings (Q,D), ok positions,
    failures) of query items."""
    import torch

    from ..retrieval.sources import iter_item_batches

    pixels, embeddings, positions, failures = [], [], [], []
    with output.progress(len(items), description) as advance, torch.no_grad():
        for pos, batch, failed in iter_item_batches(items, metric.preprocess, metric.batch_size, metric.num_workers):
            failures += failed
            if batch is not None:
                if keep_pixels:
                    pixels.append(batch)
                x = batch.to(metric.device).to(torch.float32).div_(255.0)
                embeddings.append(metric.embed_pixels(x, check=False).float())
                positions += pos
            advance(len(pos) + len(failed))
    if not positions:
        from ..errors import BadInputError

        raise BadInputError("none of the query images is readable.")
    for pos, reason in failures:
        output.warn(f"skipped {items[pos].key}: {reason}")
    return (torch.cat(pixels) if keep_pixels else None), torch.cat(embeddings), positions, failures


def _attack_from_options(attack, eps, iters, restarts, random_start, seed, dtype, force):
    if attack is None:
        return None
    return attack_settings(attack, eps, iters, restarts, random_start, seed, dtype, force=force)


def _neighbours(hits_sims, hits_ids, pool) -> list[list[dict]]:
    """Per query, its hits with their metadata (only the hit rows are read into Python)."""
    sims_rows = [list(map(float, row)) for row in hits_sims.tolist()]
    ids_rows = [list(map(int, row)) for row in hits_ids.tolist()]
    meta = pool.rows([i for row in ids_rows for i in row])
    out, at = [], 0
    for sims, ids in zip(sims_rows, ids_rows):
        row = []
        for rank, (sim, i) in enumerate(zip(sims, ids), 1):
            info, at = meta[at], at + 1
            if i < 0:
                continue
            row.append({"rank": rank, "id": i, "similarity": sim, "label": info["label"], "key": info["key"],
                        "path": info["path"], "member": info["member"]})
        out.append(row)
    return out


SEARCH_HELP = """Find the nearest pool images of each query (cosine similarity of robust embeddings).

\b
  percept retrieve search q1.jpg q2.jpg --index pool.idx -k 10
  percept retrieve search queries/ --index pool.idx --threshold 0.9        every item above a similarity
  percept retrieve search q.jpg --index pool.idx --attack linf --eps 4/255 --grid fig.png
"""


@handle_errors
def search_command(
    queries: Annotated[List[str], typer.Argument(help="Query images, folders or list files.", show_default=False)],
    index: IndexOpt,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours per query.")] = 10,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Instead of the k nearest: every item "
                                                       "with similarity >= T (range search).",
                                                       show_default=False)] = None,
    backend: BackendOpt = "auto",
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Contact sheet (.png): each query with its "
                                                 "neighbours (and, with --attack, the attacked query and its new "
                                                 "neighbours under it).")] = None,
    attack: AttackOpt = None, eps: EpsOpt = None, iters: ItersOpt = 100, restarts: RestartsOpt = 1,
    random_start: RandomStartOpt = True, force: ForceOpt = False, save_adv: SaveAdvOpt = None,
    attack_batch_size: AttackBatchOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None, seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from ..errors import BadInputError
    from ..io.outputs import check_outputs, output_file, output_folder, path_inputs
    from ..retrieval.sources import collect_items

    pool, backend = _open_pool(index, backend)
    settings = _attack_from_options(attack, eps, iters, restarts, random_start, seed, dtype, force)
    if save_adv is not None and settings is None:
        raise BadInputError("--save-adv needs --attack.")
    if grid is not None and threshold is not None:
        raise BadInputError("--grid draws the k nearest neighbours; leave out --threshold.")
    listing = collect_items(queries)
    on_disk = path_inputs([*queries, index, model])
    specs = [output_file("--grid", grid, (".png",))] if grid else []
    specs += [output_folder("--save-adv", save_adv)] if save_adv else []
    check_outputs(specs, inputs=on_disk, input_dirs=on_disk)
    common = _common(model, device, "fp32" if settings else dtype, batch_size, workers, json, quiet, seed)
    output, metric, searcher = _query_session(pool, backend, common, model)
    items = listing.items
    pixels, emb, positions, failures = _query_pixels(metric, items, output, settings is not None or grid is not None)
    results = [{"query": items[p].key} for p in positions]
    if threshold is not None:
        for result, (ids, sims) in zip(results, searcher.range(emb, threshold)):
            result["neighbours"] = _neighbours(sims[None], ids[None], pool)[0]
    else:
        hits = searcher.topk(emb, k)
        for result, row in zip(results, _neighbours(hits.sims, hits.ids, pool)):
            result["neighbours"] = row
    attacked = None
    if settings is not None:
        attacked = _attack(metric, pixels, settings, None, attack_batch_size, output)
        if threshold is not None:
            adv_lists = [_neighbours(s[None], i[None], pool)[0]
                         for i, s in searcher.range(attacked.adversarial, threshold)]
        else:
            adv_hits = searcher.topk(attacked.adversarial, k)
            adv_lists = _neighbours(adv_hits.sims, adv_hits.ids, pool)
        for result, adv in zip(results, adv_lists):
            clean_ids = {n["id"] for n in result["neighbours"]}
            result["attacked"] = {"neighbours": adv,
                                  "kept": len(clean_ids & {n["id"] for n in adv}) / max(len(clean_ids), 1),
                                  "nearest_changed": (adv[0]["id"] if adv else None) !=
                                  (result["neighbours"][0]["id"] if result["neighbours"] else None)}
        if save_adv is not None:
            _save_adv(save_adv, [items[p] for p in positions], attacked.pixels)
    if grid is not None:
        _draw_grid(grid, results, pixels, attacked, items, positions, pool)
    payload = {"index": str(index), "backend": searcher.backend, "k": None if threshold is not None else k,
               "threshold": threshold, "model": metric.source.as_dict(), "results": results,
               "skipped": [{"key": items[p].key, "reason": r} for p, r in failures],
               "attack": threat_dict(settings, decision=False) if settings else None,
               "grid": str(grid) if grid else None}
    output.result(payload, lambda console: _render_search(console, payload))


def _attack(metric, pixels, settings, targets, attack_batch_size, output):
    from ..retrieval.attack import attack_queries

    with output.progress(len(pixels), "Attacking queries") as advance:
        return attack_queries(metric, pixels, settings, targets=targets,
                              batch_size=attack_batch_size or metric.batch_size, progress=advance)


def _save_adv(folder: Path, items, pixels) -> None:
    from ..io.outputs import save_png

    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for item, x in zip(items, pixels):
        stem = Path(item.member or item.path).stem
        name, n = f"{stem}_adv.png", 1
        while name in used:
            n += 1
            name = f"{stem}_{n}_adv.png"
        used.add(name)
        save_png(folder / name, x)


def _draw_grid(path: Path, results, pixels, attacked, items, positions, pool) -> None:
    from ..io.outputs import save_png
    from ..retrieval.grid import SheetRow, neighbour_sheet

    def tiles(neighbours):
        return [_pool_pixels(pool, n) for n in neighbours], [f"{n['label'] or ''} {n['similarity']:.3f}"
                                                              for n in neighbours]

    rows = []
    for j, result in enumerate(results):
        imgs, caps = tiles(result["neighbours"])
        rows.append(SheetRow(pixels[j].float() / 255, Path(items[positions[j]].member or items[positions[j]].path).name, imgs, caps))
        if attacked is not None:
            imgs, caps = tiles(result["attacked"]["neighbours"])
            rows.append(SheetRow(attacked.pixels[j], "attacked", imgs, caps))
    save_png(path, neighbour_sheet(rows))


def _pool_pixels(pool, neighbour: dict):
    """A pool item as a (3,224,224) [0,1] tensor for a contact sheet (grey when it cannot be read now)."""
    import torch

    from ..errors import ImageReadError
    from ..io.preprocess import Preprocess
    from ..retrieval.sources import Item, read_item

    item = Item(neighbour["key"], neighbour["path"], neighbour["member"], 0, 0, neighbour["label"])
    try:
        return Preprocess(224)(read_item(item))
    except (ImageReadError, OSError):
        return torch.full((3, 224, 224), 0.5)


def _render_search(console, p: dict) -> None:
    from rich.table import Table

    for result in p["results"]:
        table = Table(title=result["query"], title_justify="left", show_edge=False)
        for col in ("rank", "similarity", "label", "item"):
            table.add_column(col, justify="right" if col in ("rank", "similarity") else "left")
        for n in result["neighbours"]:
            table.add_row(str(n["rank"]), f"{n['similarity']:.4f}", n["label"] or "", n["key"])
        console.print(table)
        if "attacked" in result:
            a = result["attacked"]
            console.print(f"  under attack: {100 * a['kept']:.0f}% of the neighbours kept; nearest "
                          f"{'changed' if a['nearest_changed'] else 'unchanged'}", markup=False)
            for n in a["neighbours"][:5]:
                console.print(f"    {n['rank']:>3} {n['similarity']:.4f} {n['label'] or ''} {n['key']}", markup=False)
    if p["grid"]:
        console.print(f"contact sheet: {p['grid']}", markup=False)


# -- classify ----------------------------------------------------------------------------------------
CLASSIFY_HELP = """Label each query by its nearest pool items (NSFW detection with safe/unsafe/buffer pools).

\b
  percept retrieve classify queries/ --index pool.idx                       truth from queries/<class>/...
  percept retrieve classify queries/ --index pool.idx -k 5 --or-with other_detector.csv
  percept retrieve classify queries/unsafe --index pool.idx --attack linf --eps 8/255 --iters 200 \\
      --attack-targets safe_targets/ --target-class safe

With ground truth, the confusion table gives the fraction of each true class assigned to each
predicted class (a buffer class is its own outcome); under --attack, clean and attacked side by side.
"""


@handle_errors
def classify_command(
    queries: Annotated[List[str], typer.Argument(help="Query images, folders or list files.", show_default=False)],
    index: IndexOpt,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours that vote (1: the nearest item's label).")]
    = 1,
    weighted: Annotated[bool, typer.Option("--weighted/--unweighted", help="With k > 1: votes weighted by "
                                           "similarity, or one each.")] = True,
    truth: Annotated[str, typer.Option("--truth", help="Ground truth: folder (first-level subfolder of each query "
                                       "folder) | none | a CSV path,label.")] = "folder",
    or_with: Annotated[Optional[Path], typer.Option("--or-with", help="CSV path,flag of another detector: a "
                                                    "query it flags is labelled --flag-label whatever the "
                                                    "retrieval says.")] = None,
    flag_label: Annotated[str, typer.Option("--flag-label", help="The label --or-with flags mean.")] = "unsafe",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Per-query report (.csv, .parquet or .jsonl).")]
    = None,
    backend: BackendOpt = "auto",
    attack: AttackOpt = None, eps: EpsOpt = None, iters: ItersOpt = 100, restarts: RestartsOpt = 1,
    random_start: RandomStartOpt = True, force: ForceOpt = False,
    attack_targets: Annotated[Optional[Path], typer.Option("--attack-targets", rich_help_panel="Attack",
                                                           help="Folder of target-class images not in the pool: "
                                                           "the targeted attack (Eq. 5) pushes each query towards "
                                                           "16 of them; without it the attack is untargeted.")]
    = None,
    target_class: Annotated[Optional[str], typer.Option("--target-class", rich_help_panel="Attack",
                                                        help="The class the targeted attack wants (reports its "
                                                        "success rate).")] = None,
    save_adv: SaveAdvOpt = None, attack_batch_size: AttackBatchOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None, seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from ..errors import BadInputError
    from ..io.images import list_images
    from ..io.outputs import check_outputs, output_file, output_folder, path_inputs
    from ..retrieval.attack import TARGET_IMAGES, select_targets
    from ..retrieval.classify import confusion, flags_for, knn_vote, or_with as combine, read_flags_csv
    from ..retrieval.reports import REPORT_FORMATS as FORMATS, write_rows
    from ..retrieval.sources import collect_items

    pool, backend = _open_pool(index, backend)
    settings = _attack_from_options(attack, eps, iters, restarts, random_start, seed, dtype, force)
    if settings is None and (attack_targets or target_class or save_adv):
        raise BadInputError("--attack-targets, --target-class and --save-adv need --attack.")
    if target_class is not None and attack_targets is None:
        raise BadInputError("--target-class names the class of --attack-targets; give the target images too.")
    csv, from_folder = _labels(truth)
    listing = collect_items(queries, labels=csv, label_from_folder=from_folder)
    targets = []
    if attack_targets is not None:
        if not attack_targets.is_dir():
            raise BadInputError(f"--attack-targets {attack_targets}: not a folder of images.")
        targets = select_targets([str(p) for p in list_images(attack_targets, recursive=True)], TARGET_IMAGES)
    flags = None
    if or_with is not None:  # every query needs the other detector's verdict: checked before the model loads
        verdicts = read_flags_csv(or_with)
        flags = dict(zip((i.key for i in listing.items),
                         flags_for([i.key for i in listing.items], verdicts, where=f"--or-with {or_with}")))
    on_disk = path_inputs([*queries, index, model, csv, or_with, attack_targets])
    specs = ([output_file("--out", out, FORMATS)] if out else []) + \
        ([output_folder("--save-adv", save_adv)] if save_adv else [])
    check_outputs(specs, inputs=on_disk, input_dirs=on_disk)
    common = _common(model, device, "fp32" if settings else dtype, batch_size, workers, json, quiet, seed)
    output, metric, searcher = _query_session(pool, backend, common, model)
    items = listing.items
    pixels, emb, positions, failures = _query_pixels(metric, items, output, settings is not None)
    codes, names = pool.label_codes()

    def keys(ids) -> list:
        return [row["key"] if row else None for row in pool.rows(ids, ("key",))]

    kept_items = [items[p] for p in positions]

    def predict(embeddings):
        hits = searcher.topk(embeddings, k)
        labels = knn_vote(hits.sims.cpu().numpy(), hits.ids.cpu().numpy(), codes, names, k=k, weighted=weighted)
        if flags is not None:
            labels = combine(labels, [flags[i.key] for i in kept_items], flag_label=flag_label)
        return labels, hits

    clean_labels, clean_hits = predict(emb)
    truth_labels = [i.label for i in kept_items]
    has_truth = any(t is not None for t in truth_labels)
    rows = [{"key": i.key, "truth": t, "predicted": p, "nearest": n, "similarity": float(s)}
            for i, t, p, n, s in zip(kept_items, truth_labels, clean_labels, keys(clean_hits.ids[:, 0].tolist()),
                                     clean_hits.sims[:, 0].tolist())]
    payload = {"index": str(index), "backend": searcher.backend, "k": k, "weighted": weighted,
               "model": metric.source.as_dict(), "or_with": str(or_with) if or_with else None,
               "counts": _count(clean_labels)}
    if has_truth:
        payload["confusion"] = confusion(truth_labels, clean_labels).as_dict()
    if settings is not None:
        target_pixels = metric.pixels(targets) if targets else None
        attacked = _attack(metric, pixels, settings, target_pixels, attack_batch_size, output)
        adv_labels, adv_hits = predict(attacked.adversarial)
        for row, p, n, s in zip(rows, adv_labels, keys(adv_hits.ids[:, 0].tolist()), adv_hits.sims[:, 0].tolist()):
            row.update(attacked_predicted=p, attacked_nearest=n,
                       attacked_similarity=float(s))
        payload["attack"] = {**threat_dict(settings, decision=False), "targeted": bool(targets),
                             "targets": targets, "target_class": target_class}
        payload["attacked_counts"] = _count(adv_labels)
        if has_truth:
            payload["attacked_confusion"] = confusion(truth_labels, adv_labels).as_dict()
        if target_class is not None:
            others = [(t, a) for t, a in zip(truth_labels, adv_labels) if t != target_class]
            payload["attack"]["success_rate"] = (sum(a == target_class for _, a in others) / len(others)
                                                 if others else None)
        if save_adv is not None:
            _save_adv(save_adv, kept_items, attacked.pixels)
    payload["skipped"] = [{"key": items[p].key, "reason": r} for p, r in failures]
    payload["queries"] = rows
    if out is not None:
        write_rows(out, rows)
        payload["out"] = str(out)
    output.result(payload, lambda console: _render_classify(console, payload))


def _count(labels) -> dict:
    counts: dict = {}
    for label in labels:
        key = label if label is not None else "none"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _confusion_table(console, title: str, conf: dict) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("true \\ predicted")
    for col in conf["pred_classes"]:
        table.add_column(str(col), justify="right")
    table.add_column("n", justify="right")
    for name, fractions, counts in zip(conf["true_classes"], conf["fractions"], conf["counts"]):
        table.add_row(str(name), *[f"{100 * f:.1f}%" for f in fractions], str(sum(counts)))
    console.print(table)


def _render_classify(console, p: dict) -> None:
    console.print("predicted: " + ", ".join(f"{k} {v}" for k, v in p["counts"].items()), markup=False)
    if "confusion" in p:
        _confusion_table(console, "clean", p["confusion"])
    if "attack" in p:
        a = p["attack"]
        kind = f"targeted towards {a['target_class'] or 'the target images'}" if a["targeted"] else "untargeted"
        console.print(f"under attack ({a['norm']}, eps {a.get('eps_text', a['eps'])}, {a['iters']} iterations, "
                      f"{kind}): " + ", ".join(f"{k} {v}" for k, v in p["attacked_counts"].items()), markup=False)
        if "attacked_confusion" in p:
            _confusion_table(console, "attacked", p["attacked_confusion"])
        if a.get("success_rate") is not None:
            console.print(f"attack success (queries of other classes now labelled {a['target_class']}): "
                          f"{100 * a['success_rate']:.1f}%", markup=False)
    if p.get("out"):
        console.print(f"per-query report: {p['out']}", markup=False)


# -- filter ------------------------------------------------------------------------------------------
FILTER_HELP = """Flag the images of a dataset that the pool retrieves as a flagged class; keep the rest.

\b
  percept retrieve filter data/ --index nsfw.idx --flag unsafe --report report.parquet
  percept retrieve filter shards/{00000..00999}.tar --index nsfw.idx --flag unsafe --flag buffer \\
      --report report.parquet --write-kept clean_shards/
  percept retrieve filter data/ --index nsfw.idx --flag unsafe --threshold 0.8 --report r.csv --resume

Every image gets one report row (decision flagged / kept / error, predicted label, nearest item,
similarity). The data is only read; --write-kept copies the kept images (new shards for shards).
"""


@handle_errors
def filter_command(
    data: Annotated[List[str], typer.Argument(help="Images: folders, list files or WebDataset shards.",
                                              show_default=False)],
    index: IndexOpt,
    flag: Annotated[List[str], typer.Option("--flag", help="A pool label to flag (repeatable).",
                                            show_default=False)],
    report: Annotated[Path, typer.Option("--report", help="Per-image report: .parquet, .csv or .jsonl.",
                                         show_default=False)],
    threshold: Annotated[Optional[float], typer.Option("--threshold", show_default=False,
                                                       help="Flag when the nearest pool item of a flagged class "
                                                       "has similarity >= T (instead of the k-NN label).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours that vote for the label.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run with the same settings.")]
    = False,
    write_kept: Annotated[Optional[Path], typer.Option("--write-kept", help="Copy the kept images (or filtered "
                                                       "shards) here.")] = None,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Images per report chunk (the unit of "
                                       "resumption).")] = 4096,
    backend: BackendOpt = "auto",
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from ..io.outputs import check_outputs, output_file, output_folder, path_inputs
    from ..retrieval.filtering import COLUMNS, FilterSettings, listing_digest, run_filter, write_kept as copy_kept
    from ..retrieval.reports import REPORT_FORMATS as FORMATS, ChunkedReport
    from ..retrieval.search import Searcher
    from ..retrieval.sources import collect_items

    pool, backend = _open_pool(index, backend)
    names = pool.label_codes()[1]
    unknown = [f for f in flag if f not in names]
    if unknown:
        from ..errors import BadInputError

        raise BadInputError(f"--flag {unknown[0]}: no image of the index has this label; its labels are "
                            f"{', '.join(names) or 'none (build it with --labels)'}.")
    listing = collect_items(data)
    on_disk = path_inputs([*data, index, model])
    specs = [output_file("--report", report, FORMATS)] + ([output_folder("--write-kept", write_kept)]
                                                          if write_kept else [])
    check_outputs(specs, inputs=on_disk, input_dirs=on_disk)
    settings = FilterSettings(tuple(flag), threshold, k, True, chunk)
    recorded = {**settings.as_dict(), "index_generation": pool.manifest.get("generation"),
                "model": pool.manifest["model"].get("weights_sha256"), "items": len(listing.items),
                "listing": listing_digest(listing.items)}
    from ..retrieval.reports import partial_folder

    if resume and report.exists() and not partial_folder(report).exists():
        from ..errors import BadInputError

        raise BadInputError(f"--resume: {report} is already complete (no unfinished chunks); leave out --resume "
                            "to compute it again.")
    chunks = ChunkedReport(report, COLUMNS, resume=resume, settings=recorded)
    common = _common(model, device, dtype, batch_size, workers, json, quiet)
    output = Output(json, quiet)
    try:
        metric = _metric_for(pool, common, output, model)
        searcher = Searcher(pool, backend, device=metric.device)
        for problem in listing.problems:
            output.warn(f"{problem.path}: {problem.reason}")
        with output.progress(len(listing.items), "Filtering") as advance:
            summary = run_filter(metric, pool, searcher, listing, chunks, settings, batch_size=batch_size,
                                 num_workers=workers, progress=advance)
    except BaseException:
        _drop_unstarted(chunks)
        raise
    payload = {"index": str(index), "backend": searcher.backend, "flags": list(flag), "threshold": threshold,
               "k": k, "report": summary.report, "items": summary.items, "decisions": summary.decisions,
               "labels": summary.labels, "chunks": summary.chunks, "chunks_resumed": summary.chunks_resumed,
               "seconds": summary.seconds, "images_per_second": summary.items / summary.seconds
               if summary.seconds else None,
               "errors": [{"key": k_, "error": e} for k_, e in summary.errors],
               "problems": [{"path": p.path, "reason": p.reason} for p in listing.problems]}
    if write_kept is not None:
        payload["written"] = copy_kept(summary.report, write_kept, listing)
    output.result(payload, lambda console: _render_filter(console, payload))


def _drop_unstarted(report) -> None:
    """Remove the partial folder of a report none of whose chunks is written (the run failed before its
    first chunk, e.g. on a refused --model), so that rerunning the command is not taken for a resume."""
    import shutil

    if not report.done():
        shutil.rmtree(report.partial, ignore_errors=True)


def _render_filter(console, p: dict) -> None:
    d = p["decisions"]
    console.print(f"{p['items']} images: {d.get('flagged', 0)} flagged ({', '.join(p['flags'])}), "
                  f"{d.get('kept', 0)} kept, {d.get('error', 0)} unreadable; report {p['report']}"
                  + (f" ({p['chunks_resumed']} of {p['chunks']} chunks from an earlier run)" if p["chunks_resumed"]
                     else ""), markup=False)
    if p["labels"]:
        console.print("predicted labels: " + ", ".join(f"{k} {v}" for k, v in p["labels"].items()), markup=False)
    if p.get("written"):
        w = p["written"]
        console.print(f"kept images written: {w['files']} files, {w['samples']} samples in {w['shards']} shards",
                      markup=False)


# -- dedup -------------------------------------------------------------------------------------------
DEDUP_HELP = """Find near-duplicate images (similarity >= T) within a source, or against an index.

\b
  percept retrieve dedup photos/ --threshold 0.95 --report groups.csv --kept-list kept.txt
  percept retrieve dedup new_batch/ --index train.idx --threshold 0.9 --report matches.csv
"""


@handle_errors
def dedup_command(
    sources: Annotated[List[str], typer.Argument(help="Images: folders, list files or WebDataset shards.",
                                                 show_default=False)],
    threshold: Annotated[float, typer.Option("--threshold", help="Similarity at or above which two images are "
                                             "duplicates.", show_default=False)],
    index: Annotated[Optional[Path], typer.Option("--index", "-i", help="Also match against this index.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Groups / matches: .csv, .parquet or .jsonl.")]
    = None,
    kept_list: Annotated[Optional[Path], typer.Option("--kept-list", help="Text file of the images to keep: one "
                                                      "per duplicate group, none that matches the index.")] = None,
    backend: BackendOpt = "auto",
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    import numpy as np

    from ..io.outputs import atomic_path, check_outputs, output_file, path_inputs
    from ..retrieval.dedup import duplicate_groups, keep_list
    from ..retrieval.reports import REPORT_FORMATS as FORMATS, write_rows
    from ..retrieval.search import Searcher, exact_range
    from ..retrieval.sources import collect_items

    pool, backend = _open_pool(index, backend) if index is not None else (None, backend)
    listing = collect_items(sources)
    on_disk = path_inputs([*sources, index, model])
    specs = ([output_file("--report", report, FORMATS)] if report else []) + \
        ([output_file("--kept-list", kept_list, (".txt",))] if kept_list else [])
    check_outputs(specs, inputs=on_disk, input_dirs=on_disk)
    common = _common(model, device, dtype, batch_size, workers, json, quiet)
    output = Output(json, quiet)
    metric = _metric_for(pool, common, output, model)
    items = listing.items
    emb, positions, failures = _embed_items(metric, items, output)
    kept_items = [items[p] for p in positions]
    stored = emb.cpu().numpy().astype(np.float16)
    pairs = []
    for i, (ids, sims) in enumerate(exact_range(emb, [stored], threshold, device=metric.device)):
        pairs += [(i, int(j)) for j in ids if int(j) != i]
    groups = duplicate_groups(len(kept_items), pairs)
    keep = keep_list(groups, len(kept_items))
    rows, matched = [], 0
    if pool is not None:
        searcher = Searcher(pool, backend, device=metric.device)
        for i, (ids, sims) in enumerate(searcher.range(emb, threshold)):
            if len(ids):
                keep[i] = False
                matched += 1
                rows.append({"group": None, "key": kept_items[i].key, "kept": False, "match": pool.rows([int(ids[0])], ("key",))[0]["key"],
                             "similarity": float(sims[0])})
    # group rows after the index matches, so that their "kept" agrees with the kept list
    rows = [{"group": g, "key": kept_items[m].key, "kept": bool(keep[m]), "match": None, "similarity": None}
            for g, members in enumerate(groups) for m in members] + rows
    if report is not None:
        write_rows(report, rows)
    if kept_list is not None:
        with atomic_path(kept_list) as tmp:
            Path(tmp).write_text("".join(f"{kept_items[i].key}\n" for i in range(len(kept_items)) if keep[i]),
                                 encoding="utf-8")
    payload = {"threshold": threshold, "images": len(kept_items), "groups": len(groups),
               "duplicates": int(sum(len(g) - 1 for g in groups)), "matched_index": matched,
               "kept": int(keep.sum()), "index": str(index) if index else None, "report": str(report) if report else None,
               "kept_list": str(kept_list) if kept_list else None,
               "group_members": [[kept_items[m].key for m in g] for g in groups],
               "skipped": [{"key": items[p].key, "reason": r} for p, r in failures]}
    output.result(payload, lambda console: _render_dedup(console, payload))


def _embed_items(metric, items, output: Output):
    """(embeddings (N,D) float32 on the metric's device, ok positions, failures) of items, without keeping pixels."""
    import torch

    from ..retrieval.sources import iter_item_batches

    rows, positions, failures = [], [], []
    with output.progress(len(items), "Embedding") as advance, torch.no_grad():
        for pos, batch, failed in iter_item_batches(items, metric.preprocess, metric.batch_size, metric.num_workers):
            failures += failed
            if batch is not None:
                x = batch.to(metric.device).to(torch.float32).div_(255.0)
                rows.append(metric.embed_pixels(x, check=False).float())
                positions += pos
            advance(len(pos) + len(failed))
    for pos, reason in failures:
        output.warn(f"skipped {items[pos].key}: {reason}")
    if not rows:
        from ..errors import BadInputError

        raise BadInputError("none of the images is readable.")
    return torch.cat(rows), positions, failures


def _render_dedup(console, p: dict) -> None:
    console.print(f"{p['images']} images: {p['groups']} duplicate groups ({p['duplicates']} duplicates)"
                  + (f", {p['matched_index']} already in {p['index']}" if p["index"] else "")
                  + f"; {p['kept']} to keep", markup=False)
    for group in p["group_members"][:20]:
        console.print("  " + "  ==  ".join(group), markup=False)
    if len(p["group_members"]) > 20:
        console.print(f"  ... and {len(p['group_members']) - 20} more groups", markup=False)


# -- map ---------------------------------------------------------------------------------------------
MAP_HELP = """mAP on revisited Oxford / Paris (Radenović et al., CVPR 2018), clean and under attack.

\b
  percept retrieve map --dataset roxford5k --root data/roxford5k
  percept retrieve map --dataset rparis6k --root data/rparis6k --attack linf --eps 4/255 --iters 100

ROOT holds jpg/ and gnd_<dataset>.pkl; queries are cropped to their boxes; single scale at the
model's input size, as the paper. Easy / Medium / Hard mAP and mP@1/5/10.
"""


@handle_errors
def map_command(
    dataset: Annotated[str, typer.Option("--dataset", help="roxford5k | rparis6k.", show_default=False)],
    root: Annotated[Path, typer.Option("--root", help="The dataset folder (jpg/ and the gnd pickle).",
                                       show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results JSON.")] = None,
    attack: AttackOpt = None, eps: EpsOpt = None, iters: ItersOpt = 100, restarts: RestartsOpt = 1,
    random_start: RandomStartOpt = True, force: ForceOpt = False,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None, seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    import json as jsonlib

    from ..io.outputs import atomic_path, check_outputs, output_file, path_inputs
    from ..retrieval import rmap

    settings = _attack_from_options(attack, eps, iters, restarts, random_start, seed, dtype, force)
    name = dataset.strip().lower()
    rmap.dataset_files(root, name)  # exit 2 on a wrong layout, before the model loads
    on_disk = path_inputs([root, model])
    check_outputs([output_file("--out", out, (".json",))] if out else [], inputs=on_disk, input_dirs=on_disk)
    common = _common(model, device, "fp32" if settings else dtype, batch_size, workers, json, quiet, seed)
    output = Output(json, quiet)
    metric = _metric_for(None, common, output, model)
    with output.status(f"Evaluating {name} ..."):
        result = rmap.run_map(metric, root, name, settings=settings, batch_size=batch_size)
    payload = {"dataset": name, "root": str(root), "model": metric.source.as_dict(), **result}
    if out is not None:
        with atomic_path(out) as tmp:
            Path(tmp).write_text(jsonlib.dumps(payload, indent=2, default=str), encoding="utf-8")
        payload["out"] = str(out)
    output.result(payload, lambda console: _render_map(console, payload))


def _render_map(console, p: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{p['dataset']} ({p['model']['name']})", title_justify="left", show_edge=False)
    table.add_column("")
    for setup in ("easy", "medium", "hard"):
        table.add_column(f"{setup} mAP", justify="right")
        table.add_column("mP@10", justify="right")
    for kind in ("clean", "attacked"):
        res = p.get(kind)
        if not res:
            continue
        table.add_row(kind, *[f"{res[s][m]:.2f}" if res[s][m] is not None else "n/a"
                              for s in ("easy", "medium", "hard") for m in ("map", "mp@10")])
    console.print(table)


app.command("index", help=INDEX_HELP, cls=PerceptCommand)(index_command)
app.command("add", help=ADD_HELP, cls=PerceptCommand)(add_command)
app.command("search", help=SEARCH_HELP, cls=PerceptCommand)(search_command)
app.command("classify", help=CLASSIFY_HELP, cls=PerceptCommand)(classify_command)
app.command("filter", help=FILTER_HELP, cls=PerceptCommand)(filter_command)
app.command("dedup", help=DEDUP_HELP, cls=PerceptCommand)(dedup_command)
app.command("map", help=MAP_HELP, cls=PerceptCommand)(map_command)
