"""The model directory a run leaves behind, and ``percept train push``.

The run directory itself becomes a model in the OpenCLIP Hub layout, loadable by every command
(``--model RUN_DIR``) and by ``open_clip`` itself: ``open_clip_config.json`` (the base model's),
``open_clip_model.safetensors`` (the base's whole state dict with the trained ``visual.*`` tensors; a LoRA
merged in), ``percept_model.json`` (method, base, preprocessing, head, adapter), ``head.safetensors``
for an MLP head, ``lora_adapter/`` (peft's own format, kept beside the merged weights) and a model card.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..io.outputs import atomic_path
from .config import TrainConfig

MODEL_FILES = ("open_clip_config.json", "open_clip_model.safetensors", "config.json", "model.safetensors",
               "percept_model.json", "head.safetensors", "README.md", "train_config.json", "log.jsonl")
MODEL_DIRS = ("lora_adapter",)


def write_json(path: Path, doc: dict) -> None:
    """``doc`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _base_config(ref, source) -> dict:
    """The base model's ``open_clip_config.json`` content (built from the architecture for a checkpoint)."""
    from ..models import hub
    from ..models.loading import resolve_files
    from ..models.openclip import open_clip_config

    if ref.kind == "checkpoint":
        model_cfg, pp = open_clip_config(None, ref.identifier)
        return {"model_cfg": model_cfg, "preprocess_cfg": {k: pp[k] for k in ("mean", "std") if k in pp}}
    files = resolve_files(ref)
    if files.config_path is not None:
        return hub.read_config(files.config_path)
    model_cfg, pp = open_clip_config(None, files.arch)
    return {"model_cfg": model_cfg, "preprocess_cfg": {k: pp[k] for k in ("mean", "std") if k in pp}}


def _visual_state(backbone: nn.Module, lora: dict | None, run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained vision tower's tensors; a peft-wrapped tower's adapter is saved, then merged."""
    if lora is None:
        return dict(backbone.state_dict())
    backbone.save_pretrained(str(run_dir / "lora_adapter"))
    merged = copy.deepcopy(backbone).merge_and_unload()
    return dict(merged.state_dict())


def export_model(run_dir: Path, config: TrainConfig, ref, source, backbone: nn.Module, preprocess, base: dict,
                 head: nn.Module | None = None, lora: dict | None = None) -> list[str]:
    """Write the model files into ``run_dir`` (atomically, each); returns their names."""
    from ..models.weights import read_state_dict

    tower = _visual_state(backbone, lora, run_dir)
    full = read_state_dict(Path(base["weights"]), torch.device("cpu")) if base.get("weights") else {}
    written = _write_weights(run_dir, ref, source, tower, full)
    head_info = None
    if head is not None:
        _save_tensors(run_dir / "head.safetensors", {k: v.float() for k, v in head.state_dict().items()})
        head_info = {"type": "mlp", "file": "head.safetensors", "dim": int(head.fc1.in_features),
                     "hidden": int(head.fc1.out_features)}
        written.append("head.safetensors")
    crop = preprocess.image_size if preprocess.crop else 0
    doc = {"schema": "percept.model/1", "method": config.kind, "base": base, "family": source.family,
           "pooling": source.pooling,
           "preprocess": {"resize": preprocess.short_side if preprocess.crop else preprocess.image_size,
                          "crop": crop},
           "head": head_info, "lora": ({**lora, "dir": "lora_adapter", "merged": True} if lora else None),
           "training": {"eps": config.eps if config.method != "2afc" else None, "norm": config.norm,
                        "steps": config.steps, "epochs": config.epochs, "seed": config.seed},
           "percept_version": __version__}
    write_json(run_dir / "percept_model.json", doc)
    written.append("percept_model.json")
    (run_dir / "README.md").write_text(model_card(config, base, doc), encoding="utf-8")
    written.append("README.md")
    if lora:
        written.append("lora_adapter/")
    return written


def _write_weights(run_dir: Path, ref, source, tower: dict, full: dict) -> list[str]:
    """The weights and config in the base's own layout: OpenCLIP (the whole CLIP state dict with the trained
    ``visual.*``) or timm (the base's state dict with the trained tensors; tensors the encoder does not use,
    such as a classifier or a final norm bypassed by the pooling, stay as the base had them)."""
    if source.family != "open_clip":
        from ..models.loading import resolve_files

        _save_tensors(run_dir / "model.safetensors", {**full, **tower})
        config_path = resolve_files(ref).config_path
        write_json(run_dir / "config.json", json.loads(Path(config_path).read_text(encoding="utf-8")))
        return ["config.json", "model.safetensors"]
    visual = {f"visual.{k}": v for k, v in tower.items()}
    if any(k.startswith("visual.") for k in full):
        full = {k: v for k, v in full.items() if not k.startswith("visual.")}
    elif full:  # a vision tower's own checkpoint: its keys carry no prefix
        full = {}
    _save_tensors(run_dir / "open_clip_model.safetensors", {**full, **visual})
    write_json(run_dir / "open_clip_config.json", _base_config(ref, source))
    return ["open_clip_config.json", "open_clip_model.safetensors"]


def model_card(config: TrainConfig, base: dict, doc: dict) -> str:
    """A Hugging Face model card for the trained model."""
    what = {"fare": "FARE adversarial fine-tuning (Schlarmann et al., ICML 2024), unsupervised",
            "tecoa": "TeCoA adversarial fine-tuning (Mao et al., ICLR 2023), supervised zero-shot classification",
            "2afc-mlp": "an MLP head trained on NIGHTS 2AFC judgements (hinge loss), encoder frozen",
            "2afc-lora": "LoRA adapters trained on NIGHTS 2AFC judgements (hinge loss), merged into the weights"}
    threat = (f"l_{'inf' if config.norm == 'linf' else '2'} eps {config.eps:.6g}, {config.pgd_steps} PGD steps"
              if config.method in ("fare", "tecoa") else "clean training")
    if doc.get("family", "open_clip") == "open_clip":
        library, loader = "open_clip", 'open_clip (`open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`)'
    else:
        library, loader = "timm", f'timm (`timm.create_model("hf-hub:ORG/NAME")`; pooling {doc.get("pooling")})'
    return f"""---
library_name: {library}
tags: [percept, perceptual-metric, adversarial-robustness, clip]
---
# {Path(config.out).name}

A vision encoder for robust perceptual distance made with `percept train {config.method}`:
{what[config.kind]}, starting from `{base.get('name')}` ({base.get('location')}).

- Training: {threat}; optimizer {config.optimizer}, lr {config.lr:g}, global batch {config.batch_size}.
- Preprocessing: {json.dumps(doc['preprocess'])} (crop 0: both sides resized, no crop).
- Head: {json.dumps(doc['head'])}; LoRA: {json.dumps(doc['lora'])}.

Use it with percept (`percept distance a.png b.png --model PATH_OR_HUB_ID`) or load the weights with
{loader}; the MLP head, if any, is in `head.safetensors`. The settings of the run are in `train_config.json`, its logs in `log.jsonl`.

Method: Croce, Schlarmann, Singh, Hein, "Adversarially Robust CLIP Models Can Induce Better (Robust)
Perceptual Metrics", SaTML 2025.
"""


def files_to_push(run_dir: Path) -> list[Path]:
    """The files of a finished run that ``train push`` uploads (no checkpoints, no TensorBoard events).

    Raises:
        BadInputError: the run has no model files yet (training not finished).
    """
    from ..errors import BadInputError

    run_dir = Path(run_dir)
    weights = ("open_clip_model.safetensors", "model.safetensors")
    if not (run_dir / "percept_model.json").is_file() or not any((run_dir / w).is_file() for w in weights):
        raise BadInputError(f"{run_dir} holds no finished model (no percept_model.json); finish or resume the "
                            "training first.")
    found = [run_dir / name for name in MODEL_FILES if (run_dir / name).is_file()]
    for folder in MODEL_DIRS:
        if (run_dir / folder).is_dir():
            found += sorted(p for p in (run_dir / folder).rglob("*") if p.is_file())
    return found


def push(run_dir: Path, repo: str, *, private: bool = False, dry_run: bool = False) -> list[str]:
    """Upload the model files of ``run_dir`` to the Hub repo ``repo`` (created if missing); returns the paths
    in the repo. ``dry_run``: only list them."""
    run_dir = Path(run_dir)
    files = [str(p.relative_to(run_dir)) for p in files_to_push(run_dir)]
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(library_name="percept", library_version=__version__)
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(run_dir), allow_patterns=files,
                      commit_message="Upload model trained with percept train")
    return files
