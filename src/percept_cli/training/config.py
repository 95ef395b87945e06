"""A training run's settings: defaults per method (the published recipes), a TOML file, command-line
overrides, validation, and the fingerprint a ``--resume`` must match.

Defaults:
  * FARE (Schlarmann et al., ICML 2024) and TeCoA (Mao et al., ICLR 2023) as fine-tuned in
    chs20/RobustVLM: AdamW, lr 1e-5, weight decay 1e-4, cosine schedule after 1,400 linear warm-up
    steps of 20,000, global batch 128; PGD l_inf eps 4/255, 10 steps of 1/255 from a uniform random
    start, with momentum 0.9 on the sign of the gradient (as their ``pgd_train.py``).
  * 2AFC fine-tuning on NIGHTS (as DreamSim and the paper): hinge loss, margin 0.05; Adam (0.5, 0.999);
    MLP head: lr 3e-4, batch 512, 20 epochs; LoRA: rank 16, alpha 32, dropout 0.2, lr 3e-4, batch 32,
    8 epochs. Images resized to the model's input size without a crop (DreamSim's 224x224 preprocessing,
    which the paper's heads use).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import BadInputError

METHODS = ("fare", "tecoa", "2afc")
HEADS = ("mlp", "lora")
OPTIMIZERS = ("adamw", "adam")
TECOA_TEMPLATE = "This is a photo of a {}."

# settings a resumed run may change: where and how often things are written, how data is decoded
RESUMABLE_CHANGES = frozenset({"out", "eval_every", "save_every", "log_every", "workers", "keep_checkpoints",
                               "device", "tensorboard", "eval_size", "eval_iters", "eval_attack"})


@dataclass
class TrainConfig:
    """Every setting of a run (see the module docstring for where the defaults come from)."""

    method: str
    out: str = ""
    model: str = "clip-convnext-b"
    checkpoint: str | None = None
    # data
    data: str | None = None            # fare / tecoa: an image folder or WebDataset shards
    classnames: str | None = None      # tecoa: one class name per line, in sorted folder order
    dataset: str = "nights"               # 2afc
    root: str | None = None            # 2afc: the dataset root
    val_fraction: float = 0.02            # fare / tecoa: held-out share of the images (seeded)
    resize: int | None = None
    crop: int | None = None            # 0: resize both sides, no crop
    pooling: str | None = None         # timm ViTs: cls_prenorm | token (default: the zoo entry's, else timm's)
    # optimisation
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 128                 # global batch, over all processes and accumulation steps
    micro_batch: int | None = None     # per process and forward pass (None: batch_size / processes)
    optimizer: str = "adamw"
    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int | None = None          # linear warm-up steps (None: 7 % of the steps, 1,400 of 20,000)
    schedule: str = "cosine"              # cosine | constant
    # adversarial inner maximisation (fare / tecoa)
    eps: float = 4 / 255
    norm: str = "linf"
    pgd_steps: int = 10
    pgd_step_size: float = 1 / 255
    pgd_momentum: float = 0.9
    template: str = TECOA_TEMPLATE
    # 2afc
    head: str = "mlp"
    margin: float = 0.05
    mlp_hidden: int = 512
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.2
    lora_targets: list[str] | None = None
    # evaluation, checkpoints, logs
    eval_every: int = 1000
    eval_size: int = 256
    eval_iters: int = 100
    eval_attack: bool = False             # 2afc: also the robust NIGHTS val accuracy
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = True
    # run
    seed: int = 0
    dtype: str = "auto"                   # autocast precision: auto = bf16 on CUDA, fp32 elsewhere
    device: str = "auto"
    workers: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @property
    def kind(self) -> str:
        """``fare``, ``tecoa``, ``2afc-mlp`` or ``2afc-lora``."""
        return f"2afc-{self.head}" if self.method == "2afc" else self.method

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}


def method_defaults(method: str, head: str = "mlp") -> dict:
    """The published recipe's settings for ``method`` (``head`` for 2afc)."""
    if method in ("fare", "tecoa"):
        return {"steps": 20000, "batch_size": 128, "optimizer": "adamw", "lr": 1e-5, "weight_decay": 1e-4,
                "betas": (0.9, 0.999), "warmup": None}
    if head == "lora":
        return {"epochs": 8, "batch_size": 32, "optimizer": "adam", "lr": 3e-4, "weight_decay": 0.0,
                "betas": (0.5, 0.999), "warmup": 0, "schedule": "constant", "crop": 0,
                "eval_every": 0, "save_every": 0}
    return {"epochs": 20, "batch_size": 512, "optimizer": "adam", "lr": 3e-4, "weight_decay": 0.0,
            "betas": (0.5, 0.999), "warmup": 0, "schedule": "constant", "crop": 0,
            "eval_every": 0, "save_every": 0}


def read_toml(path: str | Path) -> dict:
    """The settings of a ``--config run.toml`` (top level, or a ``[train]`` table).

    Raises:
        BadInputError: a missing or malformed file.
    """
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BadInputError(f"config file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInputError(f"config file {path} is not valid TOML: {exc}") from exc
    return dict(data.get("train", data))


_FIELD_TYPES = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    """A TOML/CLI value in the field's type (eps also as ``4/255``)."""
    if value is None:
        return None
    if name in ("eps", "pgd_step_size"):
        from ..attacks.threat import parse_eps

        return parse_eps(value) if isinstance(value, str) else float(value)
    if name == "betas":
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise BadInputError(f"{where}: betas must be two numbers, e.g. [0.9, 0.999].")
        try:
            return (float(value[0]), float(value[1]))
        except ValueError as exc:
            raise BadInputError(f"{where}: betas must be two numbers, e.g. [0.9, 0.999].") from exc
    if name == "lora_targets":
        return [str(v) for v in (value.split(",") if isinstance(value, str) else value)]
    default = _FIELD_TYPES[name].default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, float) or name in ("lora_alpha",):
            return float(value)
        if isinstance(default, int) or name in ("steps", "epochs", "micro_batch", "warmup", "workers", "resize",
                                                "crop"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{where}: '{name}' = {value!r} is not a valid number.") from exc
    return value


def resolve_config(method: str, file_settings: dict, cli_settings: dict) -> TrainConfig:
    """Defaults of ``method``, then the TOML file's settings, then the command line's (None = not given).

    Raises:
        BadInputError: an unknown setting, a value of the wrong type, or an invalid combination.
    """
    if method not in METHODS:
        raise BadInputError(f"unknown training method '{method}'; use one of {', '.join(METHODS)}.")
    merged: dict = {}
    for where, settings in (("config file", file_settings), ("command line", cli_settings)):
        for key, value in settings.items():
            key = key.replace("-", "_")
            if key == "method":
                if value not in (None, method):
                    raise BadInputError(f"{where}: method '{value}' does not match `percept train {method}`.")
                continue
            if key not in _FIELD_TYPES or key == "extra":
                raise BadInputError(f"{where}: unknown setting '{key}'.")
            if value is not None:
                merged[key] = _coerce(key, value, where)
    head = merged.get("head", "mlp")
    config = TrainConfig(method=method, **{**method_defaults(method, head), **merged})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Raise BadInputError for settings that cannot run (before any model or data is touched)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise BadInputError(message)

    need(bool(config.out), "no output directory: pass --out RUN_DIR.")
    need(config.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}.")
    need(config.schedule in ("cosine", "constant"), "schedule must be 'cosine' or 'constant'.")
    need(config.head in HEADS, f"head must be one of {', '.join(HEADS)}.")
    need(config.norm in ("linf", "l2"), "norm must be 'linf' or 'l2'.")
    need(config.batch_size > 0, "batch size must be positive.")
    need(config.micro_batch is None or config.micro_batch > 0, "micro batch must be positive.")
    need(config.lr > 0, "learning rate must be positive.")
    need(config.dtype in ("auto", "fp32", "bf16"), f"training dtype '{config.dtype}': use auto, fp32 or bf16 (fp16 "
         "training would need loss scaling; bf16 does not).")
    need(config.eps >= 0 and config.pgd_steps >= 0 and config.pgd_step_size >= 0,
         "eps, PGD steps and step size must not be negative.")
    need(0 < config.val_fraction < 1, "val fraction must lie strictly between 0 and 1.")
    need(config.steps is None or config.steps > 0, "steps must be positive.")
    need(config.epochs is None or config.epochs > 0, "epochs must be positive.")
    need(config.lora_r > 0 and 0 <= config.lora_dropout < 1, "LoRA rank must be positive, dropout in [0, 1).")
    if config.method in ("fare", "tecoa"):
        need(config.data is not None, f"`percept train {config.method}` needs --data IMAGES.")
    if config.method == "tecoa":
        need(config.classnames is not None, "`percept train tecoa` needs --classnames FILE (one name per line).")
    if config.method == "2afc":
        need(config.root is not None, "`percept train 2afc` needs --root DATASET_ROOT.")
        need(config.dataset == "nights", "2afc training reads NIGHTS (--dataset nights).")
    if config.method in ("fare", "tecoa") and config.norm == "linf":
        need(config.eps <= 1, f"l_inf eps {config.eps} exceeds 1 (the whole pixel range); did you mean "
             f"{config.eps:g}/255?")


def fingerprint_digest(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def config_difference(saved: dict, config: TrainConfig) -> list[str]:
    """The settings in which a saved run's fingerprint and ``config`` differ (names only, sorted)."""
    now = config.fingerprint()
    keys = (set(saved) | set(now)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if _norm(saved.get(k)) != _norm(now.get(k)))


def _norm(value):
    return list(value) if isinstance(value, tuple) else value
