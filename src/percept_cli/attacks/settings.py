"""Attack settings: one threat model and attack budget, validated once, serialised one way."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..devices import autocast_name, resolve_dtype
from ..errors import BadInputError
from .objectives import TWOAFC_LOSSES
from .threat import check_radius, format_eps, parse_eps, parse_norm

# The paper's gradient-masking check: Square Attack with margin loss, p_init 0.8, 5,000 queries
# (auto-attack's settings), on the points APGD left unbroken.
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8


@dataclass
class AttackSettings:
    """One threat model and attack budget.

    ``norm``: "linf" or "l2" (spellings such as "Linf", "l_inf", "inf", "L2" are normalised; anything
    else raises). ``eps``: a number or text such as "4/255". An l_inf ``eps`` above 1 (the whole pixel
    range, usually a forgotten /255) raises unless ``force=True``.
    ``autocast_dtype`` (e.g. torch.bfloat16 on a GPU) speeds up the attack's forward/backward;
    ``square_queries`` > 0 runs Square Attack (margin loss, window fraction ``square_p_init``) with
    that many queries on the points APGD left unbroken; the paper's check is
    ``square_queries=SQUARE_QUERIES`` (5000) with the default ``square_p_init`` 0.8.

    Raises:
        BadInputError: an unknown norm or loss, a malformed or non-positive eps, an l_inf eps > 1
            without ``force``, iters/restarts below 1, or bad Square settings; the message names the field.
    """

    norm: str = "linf"
    eps: float = 4 / 255
    iters: int = 100
    restarts: int = 1
    random_start: bool = True
    seed: int = 0
    loss: str = "ce"
    autocast_dtype: Optional[torch.dtype] = None
    square_queries: int = 0
    square_p_init: float = SQUARE_P_INIT
    force: bool = False

    def __post_init__(self):
        if self.autocast_dtype is not None:  # a name or dtype; fp32 means no autocast
            self.autocast_dtype = resolve_dtype(self.autocast_dtype)
            self.autocast_dtype = None if self.autocast_dtype == torch.float32 else self.autocast_dtype
        self.norm = parse_norm(self.norm)
        self.eps = parse_eps(self.eps)
        check_radius(self.eps, self.norm, force=self.force)
        for name in ("iters", "restarts", "square_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "square_queries" else 1):
                raise BadInputError(f"{name} must be an integer of at least {0 if name == 'square_queries' else 1}; "
                                    f"got {value!r}.")
        if not isinstance(self.loss, str) or self.loss.strip().lower() not in TWOAFC_LOSSES:
            raise BadInputError(f"loss must be one of {', '.join(TWOAFC_LOSSES)}; got {self.loss!r}.")
        self.loss = self.loss.strip().lower()
        if not isinstance(self.square_p_init, (int, float)) or not 0 < self.square_p_init <= 1:
            raise BadInputError(f"square_p_init must be in (0, 1]; got {self.square_p_init!r}.")

    def to_dict(self, *, radius: bool = True) -> dict:
        """The settings as JSON-ready values: the one serialisation used by results documents, resume
        checks and ``--json`` output. ``autocast`` is ``None`` (fp32), ``"bf16"`` or ``"fp16"``;
        ``square_p_init`` is ``None`` when Square Attack is off. ``radius=False`` leaves out ``eps``
        and ``eps_text`` (an evaluation over several radii stores them once, as its list of radii).

        >>> AttackSettings(eps="4/255").to_dict()["eps_text"]
        '4/255'
        """
        data = {"norm": self.norm, "eps": self.eps, "eps_text": format_eps(self.eps, self.norm),
                "iters": self.iters, "restarts": self.restarts, "random_start": self.random_start,
                "seed": self.seed, "loss": self.loss, "autocast": autocast_name(self.autocast_dtype),
                "square_queries": self.square_queries,
                "square_p_init": self.square_p_init if self.square_queries else None, "force": self.force}
        if not radius:
            del data["eps"], data["eps_text"]
        return data

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "AttackSettings":
        """Settings from :meth:`to_dict`'s output (``eps_text`` ignored; keys not given take the
        defaults); ``overrides`` replace single fields (e.g. ``eps=`` for a dictionary without radius).

        Raises:
            BadInputError: not a dictionary, an unknown key, or a value :class:`AttackSettings` refuses.
        """
        if not isinstance(data, dict):
            raise BadInputError(f"attack settings must be a dictionary; got {type(data).__name__}.")
        values = {k: v for k, v in {**data, **overrides}.items() if k != "eps_text"}
        unknown = sorted(set(values) - {f.name for f in fields(cls)} - {"autocast"})
        if unknown:
            raise BadInputError(f"unknown attack setting(s): {', '.join(unknown)}.")
        if "autocast" in values:
            values["autocast_dtype"] = values.pop("autocast")
        if values.get("square_p_init") is None:
            values.pop("square_p_init", None)
        return cls(**values)
