"""Model files: from the Hugging Face Hub (through its cache) or a local directory.

huggingface_hub owns caching: HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE work as
they do everywhere else. This module wraps ``hf_hub_download`` once, prefers
``.safetensors`` weights, and turns the Hub's "not cached and not reachable"
into one clear :class:`ModelUnavailableError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BadInputError, ModelFormatError, ModelUnavailableError

OPEN_CLIP = "open_clip"
TIMM = "timm"

CONFIG_FILES = {OPEN_CLIP: "open_clip_config.json", TIMM: "config.json"}
# Weight files in order of preference: safetensors first; .bin/.pth only with weights_only loading.
WEIGHT_FILES = {
    OPEN_CLIP: ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"),
    TIMM: ("model.safetensors", "pytorch_model.bin"),
}
# A trained model's record (``percept train``; see models/adapters.py), fetched with the model when present.
PERCEPT_MODEL_FILE = "percept_model.json"


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's config and weights are on disk.

    Attributes:
        family: ``open_clip`` or ``timm``.
        config_path: the JSON config file; None when the repo holds only weights and
            ``arch`` names the OpenCLIP built-in config to use.
        weights_path: the weights file.
        root: the directory holding both (a Hub snapshot or the user's directory).
        repo_id: Hub repo id, None for a local directory.
        revision: resolved commit hash of the Hub snapshot, None for a local directory.
        arch: the OpenCLIP built-in config to use when ``config_path`` is None.
        percept_config: the model's ``percept_model.json`` (a trained model: head, preprocessing), if it
            has one; its head file then lies beside it.
    """

    family: str
    config_path: Path | None
    weights_path: Path
    root: Path
    repo_id: str | None = None
    revision: str | None = None
    arch: str | None = None
    percept_config: Path | None = None

    def read_config(self) -> dict:
        """The parsed JSON config. Raises ModelFormatError if it is not valid JSON."""
        return read_config(self.config_path)


def read_config(path: Path) -> dict:
    """The parsed JSON config at ``path``. Raises ModelFormatError if it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read model config {path}: {exc}") from exc


def hub_cache_dir() -> str:
    """The huggingface_hub cache directory in force (HF_HUB_CACHE / HF_HOME honoured)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (the environment is read at call time too)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return bool(constants.HF_HUB_OFFLINE) or env


def local_model_files(directory: str | Path) -> ModelFiles:
    """Config and weights of a model directory in the Hub layout.

    Raises:
        ModelFormatError: no known config or weights file in ``directory``.
    """
    root = Path(directory)
    for family in (OPEN_CLIP, TIMM):
        config = root / CONFIG_FILES[family]
        if not config.is_file():
            continue
        for weights in WEIGHT_FILES[family]:
            if (root / weights).is_file():
                record = root / PERCEPT_MODEL_FILE
                return ModelFiles(family, config, root / weights, root,
                                  percept_config=record if record.is_file() else None)
        raise ModelFormatError(
            f"model directory {root} has {config.name} but no weights file "
            f"(expected one of {', '.join(WEIGHT_FILES[family])}).")
    raise ModelFormatError(
        f"{root} is not a model directory: expected open_clip_config.json + open_clip_model.safetensors "
        "(OpenCLIP) or config.json + model.safetensors (timm).")


def fetch_model_files(repo_id: str, revision: str | None = None, *, family: str | None = None,
                      local_only: bool = False, refresh: bool = False,
                      builtin_arch: str | None = None) -> ModelFiles:
    """Config and weights of a Hub model: from the cache if there, else downloaded into it.

    Cache-first: a cached snapshot is used without contacting the Hub (fast, and works
    offline); ``refresh=True`` (``percept models download``) asks the Hub for the newest files.
    A trained model's ``percept_model.json`` and the head file it names come with the snapshot
    when the repo has them, by the same rules (see :func:`_with_percept_files`).
    Before downloading, the Hub is probed once with a short timeout, so an offline machine
    gets its answer at once instead of after huggingface_hub's retries.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit; None for the default branch.
        family: ``open_clip`` or ``timm`` if known (zoo entries); None tries both.
        local_only: never contact the Hub (as with HF_HUB_OFFLINE=1).
        refresh: skip the cache-first lookup.
        builtin_arch: OpenCLIP built-in config to use if the repo has OpenCLIP weights but
            no ``open_clip_config.json`` (OpenAI's CLIP repos on the Hub are like that).

    Raises:
        ModelUnavailableError: not cached and the Hub cannot be reached.
        BadInputError: the repo or revision does not exist, or holds no model files.
    """
    families = (family,) if family else (OPEN_CLIP, TIMM)
    where = repo_id + (f"@{revision}" if revision else "")
    offline = local_only or hub_offline()
    if not refresh or offline:
        files = _locate(repo_id, revision, families, True, builtin_arch)
        if files is not None:
            return _with_percept_files(files, True)
    if not offline and _hub_reachable():
        files = _locate(repo_id, revision, families, False, builtin_arch)
        if files is not None:
            return _with_percept_files(files, False)
        raise BadInputError(f"Hub repo {where} holds no open_clip_config.json or config.json with weights; "
                            "it is not an OpenCLIP or timm model.")
    if _in_cache(repo_id):
        raise BadInputError(f"Hub repo {where} in the local cache ({hub_cache_dir()}) has no complete "
                            "open_clip_config.json or config.json with weights (partly downloaded, or not "
                            "an OpenCLIP or timm model).")
    raise ModelUnavailableError(
        f"model hf-hub:{where} is not in the local Hugging Face cache ({hub_cache_dir()}) "
        "and the Hub cannot be reached.",
        f"Run `percept models download hf-hub:{where}` on a connected machine and copy its cache "
        "(set HF_HUB_CACHE or HF_HOME to point at it), or pass a local model directory with --model.")


def _locate(repo_id: str, revision: str | None, families: tuple[str, ...], local_only: bool,
            builtin_arch: str | None) -> ModelFiles | None:
    """The first family whose config (or built-in arch) and weights are available; None if none."""
    for fam in families:
        config = _download(repo_id, CONFIG_FILES[fam], revision, local_only)
        if config is None and not (fam == OPEN_CLIP and builtin_arch):
            continue
        for weights_name in WEIGHT_FILES[fam]:
            weights = _download(repo_id, weights_name, revision, local_only)
            if weights is not None:
                arch = builtin_arch if config is None else None
                return ModelFiles(fam, config, weights, weights.parent, repo_id, weights.parent.name, arch)
    return None


def _with_percept_files(files: ModelFiles, local_only: bool) -> ModelFiles:
    """``files`` with the snapshot's ``percept_model.json`` (and the head file it names) when the repo has one.

    Same snapshot (commit) and same rule as the config and weights: a model found in the cache is
    completed from the cache alone (no Hub contact); one fetched from the Hub fetches these too.
    """
    record = _download(files.repo_id, PERCEPT_MODEL_FILE, files.revision, local_only)
    if record is None:
        return files
    head = _head_file_name(record)
    if head is not None:
        _download(files.repo_id, head, files.revision, local_only)  # a missing one is reported at loading
    return replace(files, percept_config=record)


def _head_file_name(record: Path) -> str | None:
    """The head file a ``percept_model.json`` names, if it can be read (it is checked when loading)."""
    try:
        head = json.loads(record.read_text(encoding="utf-8")).get("head")
    except (OSError, ValueError, AttributeError):
        return None
    name = head.get("file") if isinstance(head, dict) else None
    return name if isinstance(name, str) and name and ".." not in Path(name).parts else None


def _download(repo_id: str, filename: str, revision: str | None, local_only: bool) -> Path | None:
    """One file from the Hub cache or the Hub; None if the file is not there (or not cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from .. import __version__

    try:
        path = hf_hub_download(repo_id, filename, revision=revision, library_name="percept",
                               library_version=__version__, local_files_only=local_only)
    except GatedRepoError as exc:
        raise ModelUnavailableError(f"Hub repo {repo_id} is gated: accept its terms on huggingface.co "
                                    "and log in with `hf auth login`.") from exc
    except RepositoryNotFoundError as exc:
        raise BadInputError(f"Hub repo {repo_id} does not exist (or is private).") from exc
    except RevisionNotFoundError as exc:
        raise BadInputError(f"Hub repo {repo_id} has no revision '{revision}'.") from exc
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return Path(path)


def _in_cache(repo_id: str) -> bool:
    """Whether the cache holds any snapshot of ``repo_id`` (huggingface_hub's folder layout)."""
    snapshots = Path(hub_cache_dir()) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _hub_reachable() -> bool:
    """Whether the Hub answers at all (a short HEAD request)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # any network failure means "not reachable"; nothing else is decided here
        return False
    return True


def remote_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The commit hash the Hub resolves ``revision`` to, or None when offline/unreachable."""
    if hub_offline():
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # offline, DNS, HTTP errors: the caller shows "unknown"
        return None
