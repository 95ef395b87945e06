"""Tiny stand-in models, built by the tests, saved in the real on-disk layouts.

* OpenCLIP layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``
  (a 1-layer ViT, or a ConvNeXt-atto tower through OpenCLIP's timm adapter).
* timm layout: ``config.json`` + ``model.safetensors`` (a 1-block ViT, standing in for DINO).
* A huggingface_hub cache (``models--org--name/{blobs,snapshots,refs}``) holding
  stand-ins under the zoo's real repo ids, so the real Hub-loading path runs offline.

Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 16,
           "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
           "text_cfg": TEXT_CFG}
# OpenAI-derived CLIP ViTs (the zoo's ``-quickgelu`` archs) use QuickGELU; their stand-ins must too.
VIT_QUICKGELU_CFG = {**VIT_CFG, "quick_gelu": True}
CONVNEXT_CFG = {"embed_dim": 16,
                "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                               "timm_pool": "", "timm_proj": "linear", "image_size": 256},
                "text_cfg": TEXT_CFG}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TIMM_VIT_CFG = {"architecture": "vit_base_patch16_224",
                "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2},
                "num_classes": 0,
                "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225], "classifier": "head"}}


def build_open_clip(model_cfg: dict, seed: int = 0):
    """A randomly initialised OpenCLIP model for ``model_cfg`` (fixed seed)."""
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**model_cfg)
    model.eval()
    assert open_clip is not None
    return model


def save_open_clip_dir(directory: Path, model_cfg: dict = VIT_CFG, seed: int = 0,
                       weights_name: str = "open_clip_model.safetensors"):
    """Write an OpenCLIP model in the Hub layout; returns the model (for direct comparison)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model = build_open_clip(model_cfg, seed)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(directory / weights_name))
    else:
        torch.save(state, directory / weights_name)
    return model


def timm_config(mean=None, std=None, architecture: str | None = None, model_args: dict | None = None) -> dict:
    """A timm ``config.json`` like TIMM_VIT_CFG with other mean/std (None: leave the key out) or model."""
    pretrained = {k: v for k, v in TIMM_VIT_CFG["pretrained_cfg"].items() if k not in ("mean", "std")}
    pretrained.update({k: list(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
    return {**TIMM_VIT_CFG, "architecture": architecture or TIMM_VIT_CFG["architecture"],
            "model_args": model_args if model_args is not None else TIMM_VIT_CFG["model_args"],
            "pretrained_cfg": pretrained}


def save_timm_dir(directory: Path, seed: int = 0, config: dict = TIMM_VIT_CFG,
                  weights_name: str = "model.safetensors"):
    """Write a tiny timm model (default: a ViT) in timm's Hub layout; returns the model."""
    import timm
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=0,
                              **config["model_args"]).eval()
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(directory / weights_name))
    else:
        torch.save(state, directory / weights_name)
    return model


def add_to_hub_cache(cache: Path, repo_id: str, source_dir: Path, commit: str | None = None) -> str:
    """Put the files of ``source_dir`` into ``cache`` exactly as huggingface_hub lays out a download.

    ``models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinked to the blob,
    and ``refs/main`` holding the commit. Returns the commit hash.
    """
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(source_dir.iterdir()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snapshot), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


def build_zoo_cache(cache: Path, work: Path) -> dict[str, Path]:
    """A Hub cache with a tiny stand-in under every zoo entry's repo id.

    ConvNeXt entries get a ConvNeXt-atto OpenCLIP model, ViT entries a 1-layer
    ViT (with QuickGELU for the OpenAI-derived ``-quickgelu`` entries), DINO a tiny timm ViT.
    Returns {kind: source dir} of the stand-ins.
    """
    from percept_cli.models.zoo import list_models

    sources = {
        "convnext": work / "standin-convnext",
        "vit": work / "standin-vit",
        "vit-quickgelu": work / "standin-vit-quickgelu",
        "timm": work / "standin-timm",
    }
    save_open_clip_dir(sources["convnext"], CONVNEXT_CFG, seed=1)
    save_open_clip_dir(sources["vit"], VIT_CFG, seed=2)
    save_open_clip_dir(sources["vit-quickgelu"], VIT_QUICKGELU_CFG, seed=2)
    save_timm_dir(sources["timm"], seed=3)
    for spec in list_models():
        add_to_hub_cache(cache, spec.repo_id, sources[standin_kind(spec)])
    return sources


def standin_kind(spec) -> str:
    """Which stand-in of :func:`build_zoo_cache` sits under a zoo entry's repo id."""
    if spec.family == "timm":
        return "timm"
    if "ConvNeXt" in spec.backbone:
        return "convnext"
    return "vit-quickgelu" if spec.arch and "quickgelu" in spec.arch.lower() else "vit"
