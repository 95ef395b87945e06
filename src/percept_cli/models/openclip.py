"""OpenCLIP models: the config, the vision tower (or the whole CLIP model) built without random
initialisation, and its weights, with what ``open_clip.load_checkpoint`` does to a state dict.

The towers are open_clip's own classes, built as ``open_clip.create_model(..., precision="fp32")``
builds them; only the work that loading weights would overwrite is skipped.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFormatError
from . import hub, weights

VISUAL = "visual."


def open_clip_config(config_path: Path | None, arch: str | None, quick_gelu: bool = False) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from an ``open_clip_config.json`` or, without one, an OpenCLIP built-in arch.

    ``quick_gelu`` makes the model use QuickGELU whatever the config says (OpenAI-derived weights).
    As with ``open_clip.create_model``, no tower downloads pretrained weights of its own.

    Raises:
        ModelFormatError: an unreadable config, one without ``model_cfg``, or an unknown architecture.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if config_path is not None:
        config = hub.read_config(config_path)
        if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
            raise ModelFormatError(f"cannot build OpenCLIP model from {config_path}: it has no 'model_cfg'.")
        model_cfg, preprocess = copy.deepcopy(config["model_cfg"]), config.get("preprocess_cfg") or {}
    else:
        model_cfg, preprocess = open_clip.get_model_config(arch.replace("/", "-")), {}
        if model_cfg is None:
            raise ModelFormatError(f"cannot build OpenCLIP model from {arch}: no such OpenCLIP architecture.")
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    if "timm_model_name" in model_cfg.get("vision_cfg", {}):
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
    return model_cfg, merge_preprocess_dict(PreprocessCfg(), preprocess)


def build_open_clip(model_cfg: dict, with_text: bool, where: str) -> nn.Module:
    """The vision tower of ``model_cfg`` (``with_text``: the whole CLIP model), parameters on the meta device.

    Raises:
        ModelFormatError: a config open_clip cannot build.
    """
    import open_clip
    from open_clip import model as clip_model

    cfg = dict(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if not with_text:
        def factory():
            return clip_model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False),
                                                  None)
    else:
        cls = open_clip.CLIP
        if custom_text:
            cls = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP

        def factory():
            return cls(**cfg)
    try:
        with weights.quiet_logging():
            return weights.build_without_init(factory)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/KeyError/TypeError for bad configs
        raise ModelFormatError(f"cannot build OpenCLIP model from {where}: {exc}") from exc


def _resize_pos_embed(state: dict, visual: nn.Module, prefix: str = "") -> None:
    """open_clip's resizing of a ViT's position-embedding grid to the model's (``state`` keys under ``prefix``)."""
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed

    key = f"{prefix}positional_embedding"
    if key in state:
        wrapped = {"visual.positional_embedding": state[key]}
        resize_pos_embed(wrapped, SimpleNamespace(visual=visual))
        state[key] = wrapped["visual.positional_embedding"]


def _fit_clip_state(model: nn.Module, state: dict) -> dict:
    """What ``open_clip.load_checkpoint`` does to a whole model's state dict before loading it."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_text_pos_embed

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    _resize_pos_embed(state, model.visual, VISUAL)
    resize_text_pos_embed(state, model)
    return state


def _final_preprocess(visual: nn.Module, pp: dict) -> dict:
    """The preprocess cfg as ``create_model`` leaves it: the size is the tower's input size."""
    from open_clip.model import set_model_preprocess_cfg

    if getattr(visual, "image_size", None) is not None:
        pp["size"] = visual.image_size
    set_model_preprocess_cfg(visual, pp)
    return pp


def load_open_clip_dir(files: hub.ModelFiles, device: torch.device, with_text: bool = False,
                       quick_gelu: bool = False) -> tuple[nn.Module, dict, nn.Module | None]:
    """(vision tower, preprocess cfg, whole model or None) of an OpenCLIP Hub snapshot or directory.

    Without ``with_text`` only the vision tower is built and only its tensors are read.

    Raises:
        ModelFormatError: a config that cannot be built, or weights that do not fit it.
    """
    model_cfg, pp = open_clip_config(files.config_path, files.arch, quick_gelu)
    model = build_open_clip(model_cfg, with_text, str(files.root if files.config_path else files.arch))
    visual = model.visual if with_text else model
    if with_text:
        state = weights.read_state_dict(files.weights_path, device)
    else:
        state = weights.read_state_dict(files.weights_path, device, select=weights.tower(VISUAL))
        state = weights.strip_prefix(state, VISUAL)
    try:
        if with_text:
            weights.assign_weights(model, _fit_clip_state(model, state))
        else:
            _resize_pos_embed(state, visual)
            weights.assign_weights(visual, state)
    except Exception as exc:  # shape/key mismatches (RuntimeError), a failed resize
        raise ModelFormatError(f"weights {files.weights_path} do not fit the config: {exc}") from exc
    return visual, _final_preprocess(visual, pp), (model if with_text else None)


def load_open_clip_checkpoint(arch: str, checkpoint: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """(vision tower, preprocess cfg) of OpenCLIP architecture ``arch`` with a checkpoint's weights: a
    vision tower's own state dict, or a whole CLIP model's (its ``visual.*`` tensors are read).

    Raises:
        ModelFormatError: an unknown architecture, or a checkpoint that does not fit it.
    """
    model_cfg, pp = open_clip_config(None, arch)
    visual = build_open_clip(model_cfg, False, arch)
    state = weights.read_state_dict(checkpoint, device, select=weights.tower(VISUAL))
    try:
        weights.assign_weights(visual, weights.strip_prefix(state, VISUAL))
    except RuntimeError as exc:
        raise ModelFormatError(f"checkpoint {checkpoint} does not match architecture {arch}: "
                               f"{str(exc).splitlines()[0]}") from exc
    return visual, _final_preprocess(visual, pp)
