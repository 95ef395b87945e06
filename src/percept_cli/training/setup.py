"""Set-up of a run per method: the base model, the data and its order, the method, evaluation and export."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import BadInputError
from . import data as tdata
from .config import TrainConfig
from .methods import (
    FARE,
    TeCoA,
    TwoAFCHead,
    TwoAFCLoRA,
    lora_target_modules,
    text_embeddings,
)


@dataclass
class Job:
    """Everything the loop needs for one run."""

    method: object
    plan: tdata.Plan
    batches: Callable[[int], Iterator]
    evaluate: Callable[[int], dict] | None
    export: Callable
    base: dict


def _load_base(config: TrainConfig, device: torch.device, with_text: bool):
    """(encoder in fp32 on ``device``, its source, text encoder or None, ModelRef)."""
    from ..models.loading import load_encoder_and_text
    from ..models.naming import parse_model_name
    from ..retrieval.index import file_sha256

    ref = parse_model_name(config.model, config.checkpoint)
    no_crop_at_input_size = config.crop == 0 and config.resize is None
    encoder, source, text = load_encoder_and_text(ref, device, torch.float32, with_text=with_text,
                                                  resize=config.resize,
                                                  crop=None if no_crop_at_input_size else config.crop,
                                                  pooling=config.pooling)
    if no_crop_at_input_size:  # both sides to the model's own input size (DreamSim's 224x224 for 224 px models)
        from ..io.preprocess import Preprocess

        encoder.preprocess = Preprocess(encoder.image_size, crop=False)
    if source.head and not (config.method == "2afc" and config.head == "mlp"):
        raise BadInputError(f"'{config.model}' carries an MLP head ({source.head}); fine-tune the model without it "
                            "(its base or a run without a head), or train a new head with 2afc --head mlp.")
    if with_text and text is None:
        raise BadInputError(f"'{config.model}' has no CLIP text tower; TeCoA needs a CLIP text tower for its "
                            "class prompts.")
    base = {"name": source.name, "location": source.location, "revision": source.revision,
            "family": source.family, "pooling": source.pooling,
            "weights": source.weights, "weights_sha256": file_sha256(source.weights) if source.weights else None,
            "preprocess": encoder.preprocess.as_dict()}
    return encoder, source, text, ref, base


def _to_pixels(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).float().div_(255)


def image_batches(plan, dist, config, items, preprocess, device, expand, to_data):
    """A ``batches(start)`` generator over decoded images: per step (step, [data per micro-batch],
    [slots per micro-batch]); one DataLoader pass per epoch. ``expand(micro)`` lists the item positions
    a micro-batch decodes; ``to_data(micro, positions, batch)`` returns (data, kept micro rows)."""
    def batches(start: int):
        steps = tdata.step_batches(plan, dist.rank, config.seed, start)
        for _, entries in itertools.groupby(steps, key=lambda entry: entry[0] // plan.steps_per_epoch):
            yield from _decode_epoch(list(entries))

    def _decode_epoch(entries):
        flat = [expand(micro) for _, micros, _ in entries for micro in micros]
        stream = tdata.decode_items(items, preprocess, flat, config.workers, pin_memory=device.type == "cuda")
        for step, micros, slots in entries:
            datas, kept_slots = [], []
            for micro, slot in zip(micros, slots):
                positions, batch, failures = next(stream)
                if batch is None:
                    raise BadInputError(f"step {step}: no image of a micro-batch could be read "
                                        f"(e.g. {items[failures[0][0]].key}: {failures[0][1]}).")
                data, kept = to_data(micro, positions, batch)
                datas.append(data)
                kept_slots.append([s for m, s in zip(micro, slot) if m in kept])
            yield step, datas, kept_slots
    return batches


def build_job(config: TrainConfig, dist, device: torch.device, amp, on_event) -> Job:
    """The job for ``config.method`` (see :class:`Job`)."""
    if config.method in ("fare", "tecoa"):
        return _adversarial_job(config, dist, device, amp)
    return _twoafc_job(config, dist, device, amp, on_event)


def held_out_pixels(items, positions, preprocess, limit: int) -> tuple[torch.Tensor, list[int]]:
    """(uint8 pixels, their item positions) of up to ``limit`` held-out items (unreadable ones left out)."""
    chosen = positions[:limit]
    out, kept = [], []
    for got, batch, _ in tdata.decode_items(items, preprocess, [chosen[i:i + 64] for i in range(0, len(chosen), 64)],
                                            0):
        if batch is not None:
            out.append(batch)
            kept += got
    empty = torch.zeros((0, 3, preprocess.image_size, preprocess.image_size), dtype=torch.uint8)
    return (torch.cat(out) if out else empty), kept


def _image_split(config: TrainConfig, labelled: bool):
    images = tdata.image_data(config.data, labelled=labelled)
    train, held = tdata.split_held_out(len(images.items), config.val_fraction, config.seed)
    return images, train, held


def _adversarial_job(config, dist, device, amp) -> Job:
    """FARE (any images) or TeCoA (labelled images, class prompts through the model's text tower)."""
    from .evaluate import fare_eval, tecoa_eval
    from .export import export_model

    tecoa = config.method == "tecoa"
    images, train, held = _image_split(config, labelled=tecoa)
    names = tdata.read_classnames(config.classnames, images.classes) if tecoa else None
    plan = tdata.make_plan(len(train), config.batch_size, dist.world, config.micro_batch, config.steps, None)
    encoder, source, text_encoder, ref, base = _load_base(config, device, with_text=tecoa)
    train_items = [images.items[i] for i in train]
    tdata.check_readable(train_items, encoder.preprocess)
    encoder.backbone.requires_grad_(True)
    val, val_positions = held_out_pixels(images.items, held, encoder.preprocess, config.eval_size)
    if tecoa:
        text = text_embeddings(text_encoder, names, config.template).to(device)
        del text_encoder
        method = TeCoA(encoder, config, text)
        labels = torch.tensor(images.labels)
        train_labels, val_labels = labels[torch.tensor(train)], labels[torch.tensor(val_positions, dtype=torch.long)]
    else:
        method = FARE(encoder, config)

    def to_data(micro, positions, batch):
        x = _to_pixels(batch, device)
        return ((x, train_labels[torch.tensor(positions)].to(device)) if tecoa else x), set(positions)

    def evaluate(step):
        if not len(val):
            return {}
        if tecoa:
            return tecoa_eval(encoder, text, val, val_labels, config.eps, config.norm, config.eval_iters,
                              config.seed, device, amp)
        return fare_eval(encoder, method.teacher, val, config.eps, config.norm, config.eval_iters, config.seed,
                         device, amp)

    batches = image_batches(plan, dist, config, train_items, encoder.preprocess, device, list, to_data)
    return Job(method, plan, batches, evaluate,
               lambda run_dir: export_model(run_dir, config, ref, source, encoder.backbone, encoder.preprocess, base),
               base)


def _triplet_items(index):
    from ..retrieval.sources import Item

    paths = index.distinct_images()
    lookup = {p: i for i, p in enumerate(paths)}
    items = [Item(key=p, path=p, member=None, size=0, mtime_ns=0, label=None) for p in paths]
    triplets = torch.tensor([[lookup[t.ref], lookup[t.left], lookup[t.right]] for t in index.items])
    labels = torch.tensor([t.label for t in index.items])
    return items, triplets, labels


def _twoafc_job(config, dist, device, amp, on_event) -> Job:
    from ..evaluation.datasets import load_dataset
    from ..metric import PerceptualMetric
    from .evaluate import twoafc_eval
    from .export import export_model

    train_index = load_dataset(config.dataset, config.root, split="train")
    val_index = load_dataset(config.dataset, config.root, split="val")
    plan = tdata.make_plan(len(train_index.items), config.batch_size, dist.world, config.micro_batch, config.steps,
                           config.epochs)
    encoder, source, _, ref, base = _load_base(config, device, with_text=False)
    items, triplets, labels = _triplet_items(train_index)
    if config.head == "mlp":
        method, batches = _mlp_method(config, dist, plan, encoder, items, triplets, labels, device, amp, on_event)
        encoder.head = method.module
        lora = None
    else:
        lora = _add_lora(encoder, config)
        method = TwoAFCLoRA(encoder, config)

        def expand(micro):
            return [int(i) for i in triplets[micro].t().reshape(-1)]

        def to_data(micro, positions, batch):
            if len(positions) != 3 * len(micro):
                raise BadInputError(f"a NIGHTS image of triplets {micro[:3]} could not be read.")
            x = _to_pixels(batch, device)
            n = len(micro)
            return (x[:n], x[n:2 * n], x[2 * n:], labels[micro].to(device)), set(micro)

        batches = image_batches(plan, dist, config, items, encoder.preprocess, device, expand, to_data)
    metric = PerceptualMetric(encoder, source, batch_size=min(config.batch_size, 64), num_workers=config.workers)

    def evaluate(step):
        return twoafc_eval(metric, val_index, config.eps, config.eval_attack, config.eval_iters,
                           metric.batch_size)

    def export(run_dir):
        return export_model(run_dir, config, ref, source, encoder.backbone, encoder.preprocess, base,
                            head=method.module if config.head == "mlp" else None, lora=lora)

    return Job(method, plan, batches, evaluate, export, base)


def _mlp_method(config, dist, plan, encoder, items, triplets, labels, device, amp, on_event):
    from ..models.encoder import MLPHead
    from .loop import autocast_factory

    on_event("features", {"images": len(items)})
    feats = []
    autocast = autocast_factory(device, amp)
    chunks = [list(range(i, min(len(items), i + 64))) for i in range(0, len(items), 64)]
    for positions, batch, failures in tdata.decode_items(items, encoder.preprocess, chunks, config.workers):
        if failures:
            raise BadInputError(f"NIGHTS image {items[failures[0][0]].key} cannot be read: {failures[0][1]}.")
        with torch.no_grad(), autocast():
            feats.append(encoder(_to_pixels(batch, device)).float())
    features = torch.cat(feats)
    torch.manual_seed(config.seed)
    head = MLPHead(features.shape[1], config.mlp_hidden).to(device)
    method = TwoAFCHead(head, features, triplets.to(device), labels.to(device), config)

    def batches(start):
        for step, micros, slots in tdata.step_batches(plan, dist.rank, config.seed, start):
            yield step, [torch.tensor(m, device=device) for m in micros], slots
    return method, batches


def _add_lora(encoder, config: TrainConfig) -> dict:
    """Wrap the backbone with peft LoRA adapters (rank, alpha, dropout from ``config``); returns their settings."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise BadInputError("LoRA training needs the peft package: pip install 'percept[train]'.") from exc
    targets = lora_target_modules(encoder.backbone, config.lora_targets)
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             bias="none", target_modules=targets)
    torch.manual_seed(config.seed)
    encoder.backbone = get_peft_model(encoder.backbone, lora_config)
    return {"target_modules": targets, "r": config.lora_r, "alpha": config.lora_alpha,
            "dropout": config.lora_dropout}
