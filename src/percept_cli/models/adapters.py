"""Fine-tuned additions to a backbone: MLP heads, LoRA adapters, and trained model directories.

Three sources, one result (a head to attach, weights changed in place, the geometry to use):

* a ``percept train`` run directory (``percept_model.json``, schema ``percept.model/1``): its MLP head
  (``head.safetensors``) and its ``preprocess``; its LoRA is already merged into the weights;
* the paper authors' released MLP heads (fra31/perceptual-metrics): a PyTorch Lightning checkpoint
  whose ``state_dict`` holds ``perceptual_model.mlp.fc1.weight`` …, or a ``.safetensors`` head;
* LoRA adapters saved by peft (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``),
  among them the authors' ConvNeXt and ViT adapters: merged here as ``W += scaling * B @ A`` into
  the OpenCLIP vision tower, without peft.

Every file is read through :func:`.weights.read_state_dict` (``.pt``/``.bin`` only with
``torch.load(weights_only=True)``). Every problem is one :class:`ModelFormatError` naming the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError, ModelFormatError
from .encoder import MLPHead
from .pooling import POOLINGS
from .weights import read_state_dict

PERCEPT_MODEL_FILE = "percept_model.json"
PERCEPT_MODEL_SCHEMA = "percept.model/1"
# The authors' preprocessing for their NIGHTS-fine-tuned (MLP head / LoRA) models, as DreamSim:
# transforms.Resize((224, 224)) bicubic, no crop. (resize, crop) with crop 0 = no crop.
AUTHORS_GEOMETRY = (224, 0)
HEAD_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# Where the MLP's tensors sit in the files we read: our own head files, the authors' Lightning checkpoints.
HEAD_PREFIXES = ("", "perceptual_model.mlp.", "mlp.", "head.")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# Wrappers the adapter's module names may start with (the authors: a HF PreTrainedModel holding the
# OpenCLIP vision tower as ``.model``), tried after the name as it is.
WRAPPER_PREFIXES = ("model.", "visual.", "backbone.", "encoder.backbone.")
# The authors' ViT adapters sit on a DINO-style ViT converted from OpenCLIP's tower: its names -> OpenCLIP's.
DINO_TO_OPEN_CLIP = ((re.compile(r"^blocks\.(\d+)\.attn\.qkv$"), r"transformer.resblocks.\1.attn"),
                     (re.compile(r"^blocks\.(\d+)\.attn\.proj$"), r"transformer.resblocks.\1.attn.out_proj"),
                     (re.compile(r"^blocks\.(\d+)\.mlp\.fc1$"), r"transformer.resblocks.\1.mlp.c_fc"),
                     (re.compile(r"^blocks\.(\d+)\.mlp\.fc2$"), r"transformer.resblocks.\1.mlp.c_proj"))
# The DINO ViT (vision_transformer.py) builds its block and final norms with LayerNorm(eps=1e-6);
# OpenCLIP's are 1e-5. Its ln_pre stand-in (``pos_drop = nn.LayerNorm(dim)``) keeps torch's 1e-5.
DINO_LAYERNORM_EPS = 1e-6


@dataclass(frozen=True)
class TrainedModel:
    """What a model directory's ``percept_model.json`` says.

    Attributes:
        path: the JSON file.
        method: the training method (``fare``, ``tecoa``, ``2afc-mlp``, ``2afc-lora``), if given.
        geometry: ``(resize, crop)`` the model was trained with (crop 0: no crop), or None.
        head: the MLP head file, or None.
        lora: a LoRA adapter directory still to merge (``"merged": false``), or None.
        pooling: how a timm ViT's tokens became the embedding in training (None: timm's own / OpenCLIP).
    """

    path: Path
    method: str | None
    geometry: tuple[int, int] | None
    head: Path | None
    lora: Path | None
    pooling: str | None = None


@dataclass(frozen=True)
class FineTuning:
    """What :func:`fine_tune` did: the head to attach, the geometry to use, and what to record."""

    head: MLPHead | None = None
    geometry: tuple[int, int] | None = None
    head_source: str | None = None
    adapter_source: str | None = None


def _bad(path: Path, message: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {message}")


def _file_in(root: Path, name, path: Path, what: str) -> Path:
    """``root / name`` for a relative file name from a JSON file (no absolute paths, no ``..``)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise _bad(path, f"'{what}' must be a file name inside the model directory; got {name!r}.")
    return root / name


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _geometry(pre, path: Path) -> tuple[int, int] | None:
    if pre is None:
        return None
    resize, crop = (pre.get("resize"), pre.get("crop", 0)) if isinstance(pre, dict) else (None, None)
    if not _positive_int(resize) or not (crop == 0 or _positive_int(crop)) or crop > resize:
        raise _bad(path, f"'preprocess' must be {{\"resize\": R, \"crop\": C}} with 0 <= C <= R (0: no crop); "
                         f"got {pre!r}.")
    return resize, crop


def read_percept_model(path: str | Path) -> TrainedModel:
    """Read and check a ``percept_model.json`` (schema ``percept.model/1``).

    Raises:
        ModelFormatError: not JSON, another schema, a malformed ``preprocess``/``head``/``lora`` entry,
            or a head file / unmerged adapter directory that is missing.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(path, f"cannot read it as JSON ({str(exc).splitlines()[0]}).") from exc
    if not isinstance(doc, dict) or doc.get("schema") != PERCEPT_MODEL_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise _bad(path, f"schema {found!r} is not {PERCEPT_MODEL_SCHEMA!r} (written by another percept version?).")
    head = doc.get("head")
    head_path = None
    if head is not None:
        if not isinstance(head, dict) or head.get("type", "mlp") != "mlp":
            raise _bad(path, f"'head' must be null or {{\"type\": \"mlp\", \"file\": ...}}; got {head!r}.")
        head_path = _file_in(path.parent, head.get("file"), path, "head.file")
        if not head_path.is_file():
            raise _bad(path, f"its head file {head_path.name} is missing ({head_path}).")
    lora, lora_dir = doc.get("lora"), None
    if lora is not None:
        if not isinstance(lora, dict):
            raise _bad(path, f"'lora' must be null or an object; got {lora!r}.")
        if lora.get("merged") is False:  # not merged into the weights: merge it now
            lora_dir = _file_in(path.parent, lora.get("dir"), path, "lora.dir")
            if not lora_dir.is_dir():
                raise _bad(path, f"its LoRA adapter directory {lora_dir.name} is missing ({lora_dir}).")
    method = doc.get("method") if isinstance(doc.get("method"), str) else None
    pooling = doc.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise _bad(path, f"'pooling' must be null or one of {', '.join(POOLINGS)}; got {pooling!r}.")
    return TrainedModel(path, method, _geometry(doc.get("preprocess"), path), head_path, lora_dir, pooling)


# -- MLP heads -----------------------------------------------------------------------------------------------
def _head_candidates(keys: list[str]) -> list[str]:
    return [k for k in keys if k.endswith(HEAD_KEYS)]


def load_head(path: str | Path, device: torch.device | str = "cpu") -> MLPHead:
    """An :class:`MLPHead` (float32, eval mode) from a head file.

    Accepts ``.safetensors`` or weights-only ``.pt/.bin/.ckpt`` (a PyTorch Lightning checkpoint's
    ``state_dict`` is unwrapped) with keys ``fc1.weight`` … or the authors' ``perceptual_model.mlp.fc1.weight`` ….

    Raises:
        ModelFormatError: missing or unreadable file, Python objects weights-only loading refuses,
            no complete ``fc1``/``fc2`` set, or tensors whose shapes do not make an MLP head.
    """
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "head file not found.")
    state = read_state_dict(path, device, select=_head_candidates)
    prefix = next((p for p in HEAD_PREFIXES if all(p + k in state for k in HEAD_KEYS)), None)
    if prefix is None:
        raise _bad(path, f"not an MLP head: expected tensors {', '.join(HEAD_KEYS)} (optionally under "
                         "'perceptual_model.mlp.').")
    tensors = {k: state[prefix + k].float() for k in HEAD_KEYS}
    shape = tensors["fc1.weight"].shape
    if len(shape) != 2:
        raise _bad(path, f"fc1.weight has shape {tuple(shape)}; an MLP head's is (hidden, dim).")
    head = MLPHead(int(shape[1]), int(shape[0]))
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise _bad(path, "its fc1/fc2 shapes do not make an MLP head "
                         f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())}).") from exc
    return head.to(device).eval()


def embedding_width(backbone: nn.Module, image_size: int) -> int:
    """The width of the backbone's output: its ``output_dim`` (OpenCLIP ViT), its projection's width
    (OpenCLIP timm towers), else measured with one forward pass of a blank image."""
    width = getattr(backbone, "output_dim", None)
    if isinstance(width, int):
        return width
    proj = getattr(getattr(backbone, "head", None), "proj", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    param = next(backbone.parameters())
    with torch.no_grad():
        return int(backbone(torch.zeros(1, 3, image_size, image_size, device=param.device,
                                        dtype=param.dtype)).shape[-1])


def check_head_width(head: MLPHead, width: int, path: Path) -> None:
    """Raise ModelFormatError unless ``head`` takes ``width``-wide embeddings."""
    if head.fc1.in_features != width:
        raise _bad(path, f"the head takes {head.fc1.in_features}-d embeddings but the model gives {width}-d "
                         "ones (a head for another backbone?).")


# -- LoRA adapters -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as saved: ``scaling`` and ``{module name: (A, B)}`` (peft's prefix removed; A is
    (r, in), B (out, r), also for 1x1 convolutions)."""

    path: Path
    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _lora_scaling(config, path: Path) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) of a peft adapter config, after refusing
    what a plain merge cannot reproduce."""
    if not isinstance(config, dict):
        raise _bad(path, "not a peft adapter config (a JSON object).")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise _bad(path, f"a {kind} adapter; percept merges LoRA adapters only.")
    for key, what in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks (rank_pattern)"),
                      ("alpha_pattern", "per-module alphas (alpha_pattern)"), ("lora_bias", "LoRA biases"),
                      ("layer_replication", "layer replication"), ("target_parameters", "target_parameters"),
                      ("modules_to_save", "modules_to_save")):
        if config.get(key):
            raise _bad(path, f"uses {what}; percept merges plain LoRA adapters only.")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive_int(r) or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _bad(path, f"needs a positive integer 'r' and a number 'lora_alpha'; got r={r!r}, "
                         f"lora_alpha={alpha!r}.")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def read_lora_adapter(directory: str | Path, device: torch.device | str = "cpu") -> LoraAdapter:
    """Read a peft LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``).

    Raises:
        ModelFormatError: a missing file, an adapter type or option other than plain LoRA, or tensors
            other than ``lora_A``/``lora_B`` pairs of Linear (or 1x1 convolution) layers.
    """
    root = Path(directory)
    config_path = root / ADAPTER_CONFIG
    if not config_path.is_file():
        raise _bad(root, f"not a LoRA adapter directory (no {ADAPTER_CONFIG}).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(config_path, f"cannot read it as JSON ({str(exc).splitlines()[0]}).") from exc
    scaling = _lora_scaling(config, config_path)
    weights = next((root / name for name in ADAPTER_WEIGHTS if (root / name).is_file()), None)
    if weights is None:
        raise _bad(root, f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_state_dict(weights, device).items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(PEFT_PREFIX))
        if match is None or not (tensor.ndim == 2 or (tensor.ndim == 4 and tensor.shape[2:] == (1, 1))):
            raise _bad(weights, f"tensor '{key}' is not a lora_A/lora_B weight of a Linear or 1x1 convolution.")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor.flatten(1)  # a 1x1 conv's: (out, in)
    pairs = {}
    for name, half in halves.items():
        if set(half) != {"A", "B"}:
            raise _bad(weights, f"'{name}' has lora_{''.join(half)} but not its partner.")
        pairs[name] = (half["A"], half["B"])
    if not pairs:
        raise _bad(weights, "holds no LoRA tensors.")
    return LoraAdapter(root, scaling, pairs)


def _module(backbone: nn.Module, name: str) -> nn.Module | None:
    try:
        return backbone.get_submodule(name)
    except AttributeError:
        return None


def _weight_of(module: nn.Module | None) -> torch.Tensor | None:
    """The weight LoRA adapts in ``module``: a Linear's, a 1x1 convolution's (timm's ``conv_mlp`` ConvNeXt
    blocks), or an attention's fused ``in_proj_weight``; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module.weight
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return module.in_proj_weight  # [q; k; v], the layout of a DINO ViT's qkv Linear
    return None


def _target(backbone: nn.Module, name: str) -> tuple[torch.Tensor | None, bool]:
    """(the weight an adapter module name means, whether it came through the DINO-to-OpenCLIP names)."""
    names = [name] + [name[len(p):] for p in WRAPPER_PREFIXES if name.startswith(p)]
    for candidate in names:
        weight = _weight_of(_module(backbone, candidate))
        if weight is not None:
            return weight, False
    for candidate in names:
        for pattern, replacement in DINO_TO_OPEN_CLIP:
            if pattern.match(candidate):
                weight = _weight_of(_module(backbone, pattern.sub(replacement, candidate)))
                if weight is not None:
                    return weight, True
    return None, False


def _use_dino_layernorm_eps(backbone: nn.Module) -> None:
    """The authors' DINO ViT norms: eps 1e-6 in every block and the final norm; ``ln_pre`` stays 1e-5."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.LayerNorm) and name != "ln_pre":
            module.eps = DINO_LAYERNORM_EPS


def merge_lora(backbone: nn.Module, adapter: LoraAdapter) -> int:
    """Merge ``adapter`` into ``backbone``'s weights in place: ``W += scaling * B @ A``; returns the count.

    Module names are matched as saved, then without a wrapper prefix (``model.`` as the authors' HF
    wrapper adds, ``visual.``, ``backbone.``); the authors' ViT adapters (``blocks.{i}.attn.qkv`` of a
    DINO-style ViT) go to OpenCLIP's ``transformer.resblocks.{i}.attn.in_proj_weight`` (same [q;k;v]
    layout). Those authors' models ran the DINO ViT, whose LayerNorms use eps 1e-6 (OpenCLIP: 1e-5) except
    the one standing in for ``ln_pre``; merging such an adapter sets the tower's norms to the authors'
    eps, so embeddings match theirs.

    Raises:
        ModelFormatError: an adapter module that matches no Linear (or 1x1 convolution) weight, or whose
            ``B @ A`` does not have the weight's shape, or two adapter modules on one weight.
    """
    targets, dino = [], False
    for name, (a, b) in adapter.pairs.items():
        weight, via_dino = _target(backbone, name)
        if weight is None:
            raise _bad(adapter.path, f"adapter module '{name}' matches no Linear layer of the model "
                                     "(an adapter for another architecture?).")
        if (b.shape[0], a.shape[1]) != tuple(weight.shape[:2]) or a.shape[0] != b.shape[1]:
            raise _bad(adapter.path, f"adapter module '{name}' (A {tuple(a.shape)}, B {tuple(b.shape)}) does "
                                     f"not fit its weight {tuple(weight.shape)}.")
        if any(weight is other for other, _, _ in targets):
            raise _bad(adapter.path, f"adapter module '{name}' targets a weight another module already adapts.")
        targets.append((weight, a, b))
        dino = dino or via_dino
    with torch.no_grad():
        for weight, a, b in targets:
            delta = adapter.scaling * (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32))
            weight.copy_((weight.float() + delta.view(weight.shape)).to(weight.dtype))
    if dino:
        _use_dino_layernorm_eps(backbone)
    return len(targets)


# -- all of it -----------------------------------------------------------------------------------------------
def fine_tune(backbone: nn.Module, image_size: int, device: torch.device | str, *,
              trained: TrainedModel | None = None, head: str | Path | None = None,
              adapter: str | Path | None = None) -> FineTuning:
    """Apply a model directory's training record and/or the caller's head file and adapter directory.

    ``trained``: the directory's ``percept_model.json`` (its head, its unmerged LoRA if any, its geometry).
    ``head``/``adapter``: an MLP head file and a LoRA adapter directory given by the caller (the authors'
    released files); with either, the geometry is the authors' (``Resize((224, 224))``, no crop).
    LoRA is merged into ``backbone`` in place (before any dtype cast); the head is returned, to attach.

    Raises:
        BadInputError: a head given for a model directory that has its own.
        ModelFormatError: see :func:`read_percept_model`, :func:`load_head`, :func:`merge_lora`; also a
            head whose input width is not the backbone's output width.
    """
    if trained is not None and trained.head is not None and head is not None:
        raise BadInputError(f"the model in {trained.path.parent} has its own head ({trained.head.name}); "
                            f"a second head ({head}) cannot be attached.")
    adapters = [a for a in ((trained.lora if trained else None), adapter) if a is not None]
    for directory in adapters:
        merge_lora(backbone, read_lora_adapter(directory, device))
    head_path = Path(head) if head is not None else (trained.head if trained else None)
    mlp = None
    if head_path is not None:
        mlp = load_head(head_path, device)
        check_head_width(mlp, embedding_width(backbone, image_size), head_path)
    geometry = AUTHORS_GEOMETRY if (head is not None or adapter is not None) else (
        trained.geometry if trained else None)
    return FineTuning(mlp, geometry, str(head_path) if head_path else None,
                      ", ".join(str(a) for a in adapters) or None)
