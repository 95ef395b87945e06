"""percept: robust perceptual distance from adversarially robust vision encoders.

    >>> import percept_cli
    >>> metric = percept_cli.load_metric("rclip-f-convnext-b", device="cuda")  # doctest: +SKIP
    >>> metric.distance("a.png", "b.png")                                       # doctest: +SKIP

Heavy modules (torch, open_clip) load on first use, so importing this package
(and ``percept --help``) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "PerceptualMetric", "__version__", "get_spec", "list_models", "load_metric"]

from .models.zoo import DEFAULT_MODEL, get_spec, list_models

_LAZY = {"load_metric": "metric", "PerceptualMetric": "metric"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
