"""Build a :class:`PixelEncoder` from a :class:`ModelRef`.

Three ways in, one way out:
  * a Hub repo or local directory in OpenCLIP's layout -> ``open_clip.create_model('local-dir:...')``
    for the architecture, weights loaded safely, visual tower kept;
  * a Hub repo or local directory in timm's layout (``config.json``) -> ``timm.create_model``;
  * an OpenCLIP architecture plus a visual-encoder checkpoint (``--checkpoint``).
Weights load from ``.safetensors``, or from ``.pt/.bin`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError, ModelFormatError, ModelUnavailableError
from ..io.preprocess import Preprocess
from . import hub
from .encoder import PixelEncoder, TextEncoder
from .naming import ModelRef
from .pooling import check_pooling, refuse_pooling, set_vit_pooling

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from (for `models info` and results files)."""

    name: str
    kind: str
    location: str
    family: str
    revision: str | None = None
    weights: str | None = None
    zoo: str | None = None
    pooling: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


_LIBRARY_LOGGERS = ("timm", "open_clip")  # timm logs through ``timm.*`` loggers while building models


class _DropOpenClipChatter(logging.Filter):
    """Drops records below ERROR logged from open_clip's source files (it logs on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        module = sys.modules.get("open_clip")
        if record.levelno >= logging.ERROR or not getattr(module, "__file__", None):
            return True
        package = os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "")
        return not os.path.abspath(record.pathname).startswith(package)


@contextlib.contextmanager
def _quiet_logging():
    """Silence the INFO/WARNING chatter that open_clip and timm log while building models, and nothing else.

    The ``timm``/``open_clip`` loggers are raised to ERROR; a filter on the root *logger* (it sees only
    records logged on the root logger itself, not those propagated from the user's loggers) drops
    open_clip's ``logging.info(...)`` calls. An unconfigured root logger gets Python's last-resort handler
    for the duration, so those calls do not run ``logging.basicConfig()`` behind the user's back.
    Everything is restored on exit; other loggers are untouched.
    """
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    chatter = _DropOpenClipChatter()
    stand_in = None
    if not logging.root.handlers:
        stand_in = logging.lastResort or logging.NullHandler()
        logging.root.addHandler(stand_in)
    logging.root.addFilter(chatter)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        logging.root.removeFilter(chatter)
        if stand_in is not None:
            logging.root.removeHandler(stand_in)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``.safetensors`` or (weights-only) ``.pt/.pth/.bin/.ckpt``.

    Unwraps ``state_dict``/``model``/``model_state_dict`` containers and strips a
    DistributedDataParallel ``module.`` prefix.

    Raises:
        ModelFormatError: unreadable file, or a pickle that needs more than tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFormatError(
            f"{path} holds Python objects besides tensors; percept only loads weights_only checkpoints.",
            "Re-save it as a plain state dict, ideally as .safetensors.") from exc
    except Exception as exc:  # safetensors/zip/pickle raise assorted types for a corrupt file
        raise ModelFormatError(f"cannot read weights from {path}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{path} does not contain a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _square_size(size, where: str) -> int:
    if isinstance(size, (list, tuple)):
        size = tuple(int(s) for s in size[-2:])
        if len(set(size)) != 1:
            raise ModelFormatError(f"{where}: non-square input size {size} is not supported.")
        size = size[0]
    return int(size)


def _build_open_clip(root: Path | None, arch: str | None, quick_gelu: bool = False) -> tuple[nn.Module, dict]:
    """(CLIP model without weights, its preprocess cfg) from a directory's config or an arch name.

    ``quick_gelu`` builds QuickGELU activations whatever the config says (OpenAI-derived weights).
    """
    import open_clip

    name = f"local-dir:{root}" if root is not None else arch
    try:
        with _quiet_logging():
            model = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_text=False,
                                           force_quick_gelu=quick_gelu)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/KeyError for bad configs
        raise ModelFormatError(f"cannot build OpenCLIP model from {root or arch}: {exc}") from exc
    return model, open_clip.get_model_preprocess_cfg(model)


def _load_open_clip(files: hub.ModelFiles, keep: dict | None = None,
                    quick_gelu: bool = False) -> tuple[nn.Module, tuple, tuple, int]:
    import open_clip

    model, pp = _build_open_clip(files.root if files.config_path else None, files.arch, quick_gelu)
    if keep is not None:  # the caller wants the text tower too
        keep["model"] = model
        keep["tokenizer"] = f"local-dir:{files.root}" if files.config_path else files.arch
    try:
        with _quiet_logging():
            open_clip.load_checkpoint(model, str(files.weights_path), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFormatError(f"{files.weights_path} is not a weights-only checkpoint.") from exc
    except Exception as exc:  # shape/key mismatches, corrupt files
        raise ModelFormatError(f"weights {files.weights_path} do not fit the config: {exc}") from exc
    return model.visual, tuple(pp["mean"]), tuple(pp["std"]), _square_size(pp["size"], str(files.root))


def _load_open_clip_checkpoint(arch: str, checkpoint: Path) -> tuple[nn.Module, tuple, tuple, int]:
    model, pp = _build_open_clip(None, arch)
    state = read_state_dict(checkpoint)
    if any(k.startswith("visual.") for k in state):  # a full CLIP checkpoint: keep the vision tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    try:
        model.visual.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFormatError(f"checkpoint {checkpoint} does not match architecture {arch}: "
                               f"{str(exc).splitlines()[0]}") from exc
    return model.visual, tuple(pp["mean"]), tuple(pp["std"]), _square_size(pp["size"], arch)


def _load_timm(files: hub.ModelFiles, keep: dict | None = None,
               pooling: str | None = None) -> tuple[nn.Module, tuple, tuple, int, str | None]:
    """(model, mean, std, size, pooling in force) of a timm model; ``keep`` is unused (no text tower)."""
    import timm

    cfg = files.read_config()
    arch = cfg.get("architecture")
    if not arch:
        raise ModelFormatError(f"{files.config_path} has no 'architecture' entry (not a timm config).")
    pretrained = cfg.get("pretrained_cfg", {})
    try:
        with _quiet_logging():
            model = timm.create_model(arch, pretrained=False, num_classes=0, **cfg.get("model_args", {}))
    except Exception as exc:  # unknown arch, bad kwargs
        raise ModelFormatError(f"cannot build timm model '{arch}': {exc}") from exc
    state = read_state_dict(files.weights_path)
    classifier = pretrained.get("classifier", "head")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    try:
        model.load_state_dict(state, strict=True)
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
                          pooling: str | None = None
                          ) -> tuple[PixelEncoder, ModelSource, TextEncoder | None]:
    """:func:`load_encoder`, plus the CLIP text tower (None for vision-only models or when not asked).

    A visual-encoder checkpoint (``--checkpoint``) has no trained text tower: None as well.
    ``resize``/``crop`` override the preprocessing geometry (see :func:`input_geometry`);
    ``pooling`` overrides how a timm ViT's tokens become the embedding (a key of :data:`.pooling.POOLINGS`;
    default: the zoo entry's, else timm's own).

    Raises:
        BadInputError: an unknown pooling, or a pooling for a model that cannot provide it.
    """
    zoo = ref.spec.name if ref.spec else None
    check_pooling(pooling)
    if pooling is None and ref.spec is not None:
        pooling = ref.spec.pooling
    keep: dict | None = {} if with_text else None
    if ref.kind == "checkpoint":
        refuse_pooling(pooling, ref.name)
        backbone, mean, std, size = _load_open_clip_checkpoint(ref.identifier, ref.checkpoint)
        _check_quick_gelu(backbone, ref, f"architecture '{ref.identifier}'")
        source = ModelSource(ref.name, "checkpoint", ref.identifier, hub.OPEN_CLIP,
                             weights=str(ref.checkpoint), zoo=zoo)
    else:
        files = resolve_files(ref)
        if files.family == hub.OPEN_CLIP:
            refuse_pooling(pooling, ref.name)
            backbone, mean, std, size = _load_open_clip(files, keep, quick_gelu=_needs_quick_gelu(ref))
            _check_quick_gelu(backbone, ref, str(files.config_path or f"OpenCLIP built-in '{files.arch}'"))
        else:
            backbone, mean, std, size, pooling = _load_timm(files, keep, pooling)
        source = ModelSource(ref.name, ref.kind, files.repo_id or str(files.root), files.family,
                             revision=files.revision, weights=str(files.weights_path), zoo=zoo,
                             pooling=pooling)
    preprocess = input_geometry(ref, size, resize, crop)
    encoder = PixelEncoder(backbone, mean, std, preprocess.image_size, preprocess=preprocess)
    encoder.eval().requires_grad_(False)
    encoder.to(device)
    encoder.set_compute_dtype(dtype)
    text = None
    if keep and "model" in keep:
        import open_clip

        with _quiet_logging():
            tokenizer = open_clip.get_tokenizer(keep["tokenizer"])
        text = TextEncoder(keep["model"], tokenizer).eval().requires_grad_(False).to(device)
    return encoder, source, text


NO_CROP = 0


def input_geometry(ref: ModelRef, config_size: int, resize: int | None = None,
                   crop: int | None = None) -> Preprocess:
    """The preprocessing of a model: the zoo entry's (resize, crop), else the config's size, then overrides.

    Args:
        config_size: the input size the model's own config states (used when the zoo has none).
        resize: override of the short side before the crop (or of both sides without a crop).
        crop: override of the crop size; ``NO_CROP`` (0) resizes both sides to ``resize`` without a crop.

    Raises:
        BadInputError: a crop larger than the resized image, or a non-positive size.
    """
    spec = ref.spec
    base_resize, base_crop = config_size, config_size
    if spec is not None and spec.resize is not None:
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
                "weights": str(files.weights_path)}
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


def download_model(name: str) -> hub.ModelFiles:
    """Fetch a Hub model's config and weights into the Hugging Face cache, asking the Hub for the
    newest revision (offline: the cached snapshot, if any)."""
    from .naming import parse_model_name

    ref = parse_model_name(name)
    if ref.kind != "hf-hub":
        raise BadInputError(f"'{name}' is a local model; there is nothing to download.")
    return resolve_files(ref, refresh=True)
