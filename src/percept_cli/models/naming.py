"""The one place that turns a ``--model`` string into a :class:`ModelRef`.

Accepted forms::

    rclip-f-convnext-b                 a zoo name (or alias)
    hf-hub:ORG/NAME[@REVISION]         any OpenCLIP (or timm) repo on the Hub
    local-dir:/path  or  /path         a directory in the Hub layout
    ARCH --checkpoint FILE             an OpenCLIP architecture plus a visual-encoder checkpoint
    ZOO-NAME --checkpoint FILE         the zoo entry's architecture plus that checkpoint
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, UnknownModelError
from .zoo import ModelSpec, find_spec, suggest_models

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model name.

    Attributes:
        kind: ``hf-hub``, ``local-dir`` or ``checkpoint``.
        identifier: the repo id (``hf-hub``), directory (``local-dir``), or
            OpenCLIP architecture name (``checkpoint``).
        revision: Hub revision (branch, tag or commit) or None for the default.
        checkpoint: visual-encoder weights file (kind ``checkpoint`` only).
        spec: the zoo entry the name came from, if any.
        name: the string the user gave.
    """

    kind: str
    identifier: str
    name: str
    revision: str | None = None
    checkpoint: Path | None = None
    spec: ModelSpec | None = None


def parse_model_name(name: str, checkpoint: str | Path | None = None) -> ModelRef:
    """Parse a ``--model`` value (and optional ``--checkpoint``) into a ModelRef.

    Raises:
        UnknownModelError: the name matches no accepted form.
        BadInputError: a malformed ``hf-hub:`` id, or a checkpoint that does not exist.

    >>> parse_model_name("hf-hub:chs20/fare2-clip").identifier
    'chs20/fare2-clip'
    """
    text = (name or "").strip()
    if not text:
        raise UnknownModelError("empty model name.", suggest_models(""))
    if checkpoint is not None:
        return _checkpoint_ref(text, Path(checkpoint))
    spec = find_spec(text)
    if spec is not None:
        return _hub_ref(spec.source[len(HF_HUB_PREFIX):], text, spec)
    if text.startswith(HF_HUB_PREFIX):
        return _hub_ref(text[len(HF_HUB_PREFIX):], text, None)
    if text.startswith(LOCAL_DIR_PREFIX):
        return _dir_ref(Path(text[len(LOCAL_DIR_PREFIX):]).expanduser(), text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _dir_ref(path, text)
    if path.exists():
        raise BadInputError(
            f"model '{text}' is a file, not a model directory.",
            "To load a visual-encoder checkpoint, pass its architecture with --model and the file with --checkpoint.")
    if looks_like_path(text):
        hub = f"For the Hub repository, write hf-hub:{text}. " if _REPO_ID.match(text) else ""
        raise BadInputError(f"model directory '{text}': no such directory.",
                            hub + "A model directory holds open_clip_config.json (or timm's config.json) and the "
                            "weights; zoo names are listed by `percept models list`.")
    raise UnknownModelError(f"unknown model '{text}'.", suggest_models(text))


def looks_like_path(text: str) -> bool:
    """True for a name meant as a directory: it contains a path separator or starts with ``.`` or ``~``."""
    import os

    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return text.startswith((".", "~")) or any(sep in text for sep in separators)


def _hub_ref(repo: str, name: str, spec: ModelSpec | None) -> ModelRef:
    repo, _, revision = repo.partition("@")
    if not _REPO_ID.match(repo):
        raise BadInputError(f"'{name}' is not a valid Hub model id; expected hf-hub:ORG/NAME[@REVISION].")
    return ModelRef("hf-hub", repo, name, revision=revision or None, spec=spec)


def _dir_ref(path: Path, name: str) -> ModelRef:
    if not path.is_dir():
        raise BadInputError(f"model directory '{path}' does not exist.")
    return ModelRef("local-dir", str(path.resolve()), name)


def _checkpoint_ref(arch: str, checkpoint: Path) -> ModelRef:
    if not checkpoint.is_file():
        raise BadInputError(f"checkpoint '{checkpoint}' does not exist or is not a file.")
    spec = find_spec(arch)
    arch_name = arch
    if spec is not None:
        arch_name = _arch_of_spec(spec)
    elif not _is_open_clip_arch(arch):
        raise UnknownModelError(
            f"unknown architecture '{arch}' for --checkpoint.",
            "Use an OpenCLIP architecture name (e.g. convnext_base_w, ViT-B-16, ViT-L-14) or a zoo name.")
    return ModelRef("checkpoint", arch_name, arch, checkpoint=checkpoint.resolve(), spec=spec)


def _arch_of_spec(spec: ModelSpec) -> str:
    if spec.arch is None:
        raise BadInputError(f"--checkpoint is not supported for '{spec.name}'; pass an OpenCLIP architecture name.")
    return spec.arch


def _is_open_clip_arch(arch: str) -> bool:
    import open_clip  # heavy import, only on this path

    return arch in open_clip.list_models()
