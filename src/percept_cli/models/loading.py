"""Build a :class:`PixelEncoder` from a :class:`ModelRef`.

Three ways in, one way out:
  * a Hub repo or local directory in OpenCLIP's layout -> its ``open_clip_config.json``; only the
    vision tower is built (the whole CLIP model when the text tower is wanted) and only its weights read;
  * a Hub repo or local directory in timm's layout (``config.json``) -> ``timm.create_model``;
  * an OpenCLIP architecture plus a visual-encoder checkpoint (``--checkpoint``).
Fine-tuned additions (:mod:`.adapters`): a trained model directory's ``percept_model.json`` (its MLP head
and preprocessing), and MLP head files / LoRA adapters the caller names (the paper authors' releases;
LoRA is merged into the weights).
Models are built with their parameters on the meta device (no random initialisation; see
:mod:`.weights`), then take the checkpoint's tensors, read straight to the target device from
``.safetensors``, or from ``.pt/.bin`` with ``torch.load(weights_only=True)``. The result is the model
``open_clip.create_model`` + ``load_checkpoint`` (or ``timm.create_model`` + ``load_state_dict``) gives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError, ModelFormatError, ModelUnavailableError
from ..io.preprocess import Preprocess
from . import adapters, hub, openclip, weights
from .encoder import PixelEncoder, TextEncoder, prefers_channels_last
from .naming import ModelRef
from .pooling import check_pooling, refuse_pooling, set_vit_pooling
from .weights import read_state_dict

__all__ = ["ModelSource", "describe_model", "download_model", "input_geometry", "load_encoder",
           "load_encoder_and_text", "read_state_dict", "resolve_files"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from (for `models info` and results files).

    ``head``: the MLP head file attached (a trained directory's or the caller's), ``adapter``: the LoRA
    adapter directory merged at load time (None for a trained directory, whose LoRA is in its weights).
    """

    name: str
    kind: str
    location: str
    family: str
    revision: str | None = None
    weights: str | None = None
    zoo: str | None = None
    pooling: str | None = None
    head: str | None = None
    adapter: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _square_size(size, where: str) -> int:
    if isinstance(size, (list, tuple)):
        size = tuple(int(s) for s in size[-2:])
        if len(set(size)) != 1:
            raise ModelFormatError(f"{where}: non-square input size {size} is not supported.")
        size = size[0]
    return int(size)


def _load_timm(files: hub.ModelFiles, device: torch.device, pooling: str | None = None
               ) -> tuple[nn.Module, tuple, tuple, int, str | None]:
    """(model, mean, std, size, pooling in force) of a timm model (classifier weights left unread)."""
    import timm

    cfg = files.read_config()
    arch = cfg.get("architecture")
    if not arch:
        raise ModelFormatError(f"{files.config_path} has no 'architecture' entry (not a timm config).")
    pretrained = cfg.get("pretrained_cfg", {})
    try:
        with weights.quiet_logging():
            model = weights.build_without_init(lambda: timm.create_model(
                arch, pretrained=False, num_classes=0, **cfg.get("model_args", {})))
    except Exception as exc:  # unknown arch, bad kwargs
        raise ModelFormatError(f"cannot build timm model '{arch}': {exc}") from exc
    classifier = f'{pretrained.get("classifier", "head")}.'
    state = read_state_dict(files.weights_path, device,
                            select=lambda keys: [k for k in keys if not k.startswith(classifier)])
    try:
        weights.assign_weights(model, state)
    except RuntimeError as exc:
        raise ModelFormatError(f"weights {files.weights_path} do not fit '{arch}': "
                               f"{str(exc).splitlines()[0]}") from exc
    pooling = set_vit_pooling(model, pooling, arch)
    size = _square_size(pretrained.get("input_size", (3, 224, 224)), str(files.config_path))
    mean, std = pretrained.get("mean", IMAGENET_MEAN), pretrained.get("std", IMAGENET_STD)
    return model, tuple(mean), tuple(std), size, pooling


def _needs_quick_gelu(ref: ModelRef) -> bool:
    """A zoo entry derived from OpenAI's CLIP (its architecture is a ``-quickgelu`` one)."""
    return bool(ref.spec and ref.spec.arch and "quickgelu" in ref.spec.arch.lower())


def _check_quick_gelu(visual: nn.Module, ref: ModelRef, where: str) -> None:
    """Refuse a zoo entry whose built-in architecture uses QuickGELU but whose model was built without it.

    OpenAI's CLIP (and the robust ViT-L/14 models fine-tuned from it) use QuickGELU; the same
    weights run with GELU give wrong embeddings without any error. Such entries are built with
    QuickGELU forced (a Hub config may omit ``quick_gelu``); this check is the safety net.

    Raises:
        ModelFormatError: the vision tower's MLP activations are not all QuickGELU.
    """
    spec = ref.spec
    if not _needs_quick_gelu(ref):
        return
    from open_clip.transformer import QuickGELU

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None) or []
    acts = [getattr(getattr(block, "mlp", None), "gelu", None) for block in blocks]
    if acts and all(isinstance(act, QuickGELU) for act in acts):
        return
    found = type(acts[0]).__name__ if acts else "no transformer blocks"
    raise ModelFormatError(
        f"{where} builds the vision tower of '{spec.name}' with {found}, but {spec.backbone} models derived "
        "from OpenAI's CLIP need QuickGELU; its weights would give wrong embeddings.",
        f'Add "quick_gelu": true to "model_cfg" in its open_clip_config.json, or load the weights into the '
        f"'{spec.arch}' architecture as a checkpoint.",
        option_hints={"--checkpoint": f"Or pass --model {spec.arch} --checkpoint FILE."})


def resolve_files(ref: ModelRef, local_only: bool = False, refresh: bool = False) -> hub.ModelFiles:
    """The config and weights files for a Hub or local-dir reference (cache-first for the Hub)."""
    if ref.kind == "local-dir":
        return hub.local_model_files(ref.identifier)
    family = ref.spec.family if ref.spec else None
    arch = ref.spec.arch if ref.spec else None
    return hub.fetch_model_files(ref.identifier, ref.revision, family=family, local_only=local_only,
                                 refresh=refresh, builtin_arch=arch)


def load_encoder(ref: ModelRef, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, **options) -> tuple[PixelEncoder, ModelSource]:
    """Load the model ``ref`` names as an eval-mode, frozen PixelEncoder on ``device``.

    Raises:
        ModelUnavailableError: Hub model neither cached nor reachable.
        ModelFormatError: files that are not a model percept can read.
    """
    encoder, source, _ = load_encoder_and_text(ref, device, dtype, with_text=False, **options)
    return encoder, source


def load_encoder_and_text(ref: ModelRef, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          with_text: bool = True, *, resize: int | None = None, crop: int | None = None,
                          pooling: str | None = None, head: str | Path | None = None,
                          adapter: str | Path | None = None
                          ) -> tuple[PixelEncoder, ModelSource, TextEncoder | None]:
    """:func:`load_encoder`, plus the CLIP text tower (None for vision-only models or when not asked).

    A visual-encoder checkpoint (``--checkpoint``) has no trained text tower: None as well.
    ``resize``/``crop`` override the preprocessing geometry (see :func:`input_geometry`);
    ``pooling`` overrides how a timm ViT's tokens become the embedding (a key of :data:`.pooling.POOLINGS`;
    default: the zoo entry's, else timm's own). ``head``: an MLP head file to attach; ``adapter``: a LoRA
    adapter directory to merge into the weights (see :func:`.adapters.fine_tune`: with either, the geometry
    is the authors' 224 px without a crop unless ``resize``/``crop`` say otherwise). A model directory with
    a ``percept_model.json`` gets its own head and preprocessing.

    Raises:
        BadInputError: an unknown pooling, or a pooling for a model that cannot provide it.
        ModelFormatError: a malformed ``percept_model.json``, head file or adapter (see :mod:`.adapters`).
    """
    check_pooling(pooling)
    if pooling is None and ref.spec is not None:
        pooling = ref.spec.pooling
    device = torch.device(device)
    backbone, (mean, std, size), source, text_model, trained = _build(ref, device, with_text, pooling)
    tuned = adapters.fine_tune(backbone, size, device, trained=trained, head=head, adapter=adapter)
    source = replace(source, head=tuned.head_source, adapter=tuned.adapter_source)
    preprocess = input_geometry(ref, size, resize, crop, base=tuned.geometry)
    encoder = PixelEncoder(backbone, mean, std, preprocess.image_size, preprocess=preprocess)
    encoder.to(device)  # the weights are there already; computed buffers and mean/std follow
    if tuned.head is not None:
        encoder.set_head(tuned.head)
    encoder.eval().requires_grad_(False)
    encoder.set_compute_dtype(dtype)
    if prefers_channels_last(backbone, device):
        encoder.set_channels_last(True)
    text = None
    if text_model is not None:
        import open_clip

        with weights.quiet_logging():
            tokenizer = open_clip.get_tokenizer(text_model[1])
        text = TextEncoder(text_model[0], tokenizer).eval().requires_grad_(False).to(device)
    return encoder, source, text


def _build(ref: ModelRef, device: torch.device, with_text: bool, pooling: str | None):
    """(backbone, (mean, std, size), source, (CLIP model, tokenizer name) or None, trained record or None)."""
    zoo = ref.spec.name if ref.spec else None
    text_model = None  # (CLIP model, tokenizer name) when the text tower is kept
    if ref.kind == "checkpoint":
        refuse_pooling(pooling, ref.name)
        backbone, pp = openclip.load_open_clip_checkpoint(ref.identifier, ref.checkpoint, device)
        mean, std, size = tuple(pp["mean"]), tuple(pp["std"]), _square_size(pp["size"], ref.identifier)
        _check_quick_gelu(backbone, ref, f"architecture '{ref.identifier}'")
        source = ModelSource(ref.name, "checkpoint", ref.identifier, hub.OPEN_CLIP,
                             weights=str(ref.checkpoint), zoo=zoo)
        return backbone, (mean, std, size), source, None, None
    files = resolve_files(ref)
    # a trained directory's record is checked before any weights are read
    trained = adapters.read_percept_model(files.percept_config) if files.percept_config else None
    if files.family == hub.OPEN_CLIP:
        refuse_pooling(pooling, ref.name)
        backbone, pp, clip_model = openclip.load_open_clip_dir(files, device, with_text, _needs_quick_gelu(ref))
        mean, std, size = tuple(pp["mean"]), tuple(pp["std"]), _square_size(pp["size"], str(files.root))
        if clip_model is not None:
            text_model = (clip_model, f"local-dir:{files.root}" if files.config_path else files.arch)
        _check_quick_gelu(backbone, ref, str(files.config_path or f"OpenCLIP built-in '{files.arch}'"))
    else:
        if pooling is None and trained is not None:  # a trained ViT keeps the pooling it was trained with
            pooling = trained.pooling
        backbone, mean, std, size, pooling = _load_timm(files, device, pooling)
    source = ModelSource(ref.name, ref.kind, files.repo_id or str(files.root), files.family,
                         revision=files.revision, weights=str(files.weights_path), zoo=zoo, pooling=pooling)
    return backbone, (mean, std, size), source, text_model, trained


NO_CROP = 0


def input_geometry(ref: ModelRef, config_size: int, resize: int | None = None,
                   crop: int | None = None, *, base: tuple[int, int] | None = None) -> Preprocess:
    """The preprocessing of a model: ``base``, else the zoo entry's (resize, crop), else the config's size,
    then overrides.

    Args:
        config_size: the input size the model's own config states (used when the zoo has none).
        base: a fine-tuned model's own (resize, crop) (``percept_model.json``'s, or the authors' for their
            heads and adapters), in place of the zoo entry's and the config's.
        resize: override of the short side before the crop (or of both sides without a crop).
        crop: override of the crop size; ``NO_CROP`` (0) resizes both sides to ``resize`` without a crop.

    Raises:
        BadInputError: a crop larger than the resized image, or a non-positive size.
    """
    spec = ref.spec
    base_resize, base_crop = config_size, config_size
    if base is not None:
        base_resize, base_crop = base
    elif spec is not None and spec.resize is not None:
        base_resize, base_crop = spec.resize, (spec.crop if spec.crop is not None else NO_CROP)
    new_resize = base_resize if resize is None else int(resize)
    if crop is None:
        # a new resize alone keeps the model's crop, unless the crop would exceed it
        new_crop = base_crop if resize is None or base_crop == NO_CROP or base_crop <= new_resize else new_resize
    else:
        new_crop = int(crop)
    if new_crop == NO_CROP:
        return Preprocess(new_resize, crop=False)
    return Preprocess(new_crop, resize=new_resize)


def describe_model(name: str, checkpoint: str | Path | None = None) -> dict:
    """Where a model comes from and whether its files are present, without loading it.

    Never downloads. For Hub models: the cache path and resolved revision if cached;
    otherwise the revision the Hub reports (when reachable).
    """
    from .naming import parse_model_name

    ref = parse_model_name(name, checkpoint)
    spec = ref.spec
    info = {"name": name, "zoo": spec.name if spec else None, "kind": ref.kind, "source": ref.identifier,
            "family": spec.family if spec else None, "label": spec.label if spec else None,
            "backbone": spec.backbone if spec else None, "method": spec.method if spec else None,
            "image_size": spec.image_size if spec else None,
            "preprocess": ({"resize": spec.resize, "crop": spec.crop} if spec else None),
            "pooling": spec.pooling if spec else None, "reference": spec.reference if spec else None,
            "nights": asdict(spec.nights) if spec else None}
    if ref.kind == "checkpoint":
        return {**info, "present": True, "path": str(ref.checkpoint), "revision": None}
    if ref.kind == "local-dir":
        files = hub.local_model_files(ref.identifier)
        return {**info, "family": files.family, "present": True, "path": str(files.root), "revision": None,
                "weights": str(files.weights_path), **_fine_tuning(files)}
    info.update(source=f"hf-hub:{ref.identifier}", requested_revision=ref.revision, cache_dir=hub.hub_cache_dir())
    try:
        files = resolve_files(ref, local_only=True)
    except ModelUnavailableError:
        return {**info, "present": False, "path": None,
                "revision": hub.remote_revision(ref.identifier, ref.revision)}
    return {**info, "family": files.family, "present": True, "path": str(files.root),
            "revision": files.revision, "weights": str(files.weights_path),
            "config": str(files.config_path) if files.config_path else f"OpenCLIP built-in '{files.arch}'",
            "size_bytes": sum(p.stat().st_size for p in (files.config_path, files.weights_path) if p)}


def _fine_tuning(files: hub.ModelFiles) -> dict:
    """``percept models info`` fields of a trained model (``percept_model.json``): method, base, head, LoRA."""
    record = getattr(files, "percept_config", None)
    if record is None:
        return {}
    try:
        doc = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"fine_tuned": f"unreadable {record}"}
    base = doc.get("base") or {}
    parts = [str(doc.get("method")), f"from {base.get('name')}" if base.get("name") else None,
             "with an MLP head" if doc.get("head") else None, "LoRA merged" if doc.get("lora") else None]
    return {"fine_tuned": ", ".join(p for p in parts if p), "method": doc.get("method")}


def download_model(name: str) -> hub.ModelFiles:
    """Fetch a Hub model's config and weights into the Hugging Face cache, asking the Hub for the
    newest revision (offline: the cached snapshot, if any)."""
    from .naming import parse_model_name

    ref = parse_model_name(name)
    if ref.kind != "hf-hub":
        raise BadInputError(f"'{name}' is a local model; there is nothing to download.")
    return resolve_files(ref, refresh=True)
