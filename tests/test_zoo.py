"""The zoo table: complete, unambiguous, and covering what the paper evaluated."""

from __future__ import annotations

import pytest

from percept_cli.models import zoo


def test_default_is_fare_convnext():
    spec = zoo.get_spec(zoo.DEFAULT_MODEL)
    assert spec.source == "hf-hub:chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg"
    assert (spec.method, spec.backbone, spec.image_size) == ("FARE", "ConvNeXt-B", 224)


def test_names_and_aliases_are_unique_and_typable():
    keys = [k for s in zoo.list_models() for k in (s.name, *s.aliases)]
    assert len(keys) == len(set(k.lower() for k in keys))
    assert all(k == k.lower() and " " not in k for k in keys)


def test_required_entries_present():
    sources = {s.source for s in zoo.list_models()}
    for method in ("FARE4", "TeCoA4"):
        for arch in ("convnext_base_w-laion2B-s13B-b82K-augreg", "ViT-B-16-laion2B-s34B-b88K",
                     "ViT-B-32-laion2B-s34B-b79K"):
            assert f"hf-hub:chs20/{method}-{arch}" in sources
    for repo in ("fare2-clip", "fare4-clip", "tecoa2-clip", "tecoa4-clip"):
        assert f"hf-hub:chs20/{repo}" in sources
    for repo in ("laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
                 "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        assert f"hf-hub:{repo}" in sources
    assert any(s.family == "timm" and "dino" in s.source for s in zoo.list_models())


def test_nights_numbers_are_percentages_and_robust_below_clean():
    for s in zoo.list_models():
        for value in (s.nights.clean, s.nights.linf, s.nights.l2):
            assert value is None or 0.0 <= value <= 100.0
        if s.nights.clean is not None and s.nights.linf is not None:
            assert s.nights.linf <= s.nights.clean


def test_unknown_name():
    with pytest.raises(zoo.UnknownModelError):
        zoo.get_spec("nope")
