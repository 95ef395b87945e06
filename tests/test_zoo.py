"""The zoo table: complete, unambiguous, covering what the paper evaluated, every number sourced."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from percept_cli.models import zoo

# The vocabulary a published number may use (written out here, not read from the zoo).
BENCHMARKS = {"nights", "nights_imagenet", "nights_no_imagenet", "bapps", "things", "roxford_medium", "roxford_hard",
              "rparis_medium", "rparis_hard", "nsfw"} | {
    f"bapps_{s}" for s in ("traditional", "cnn", "superres", "deblur", "color", "frameinterp")}
THREAT_RE = re.compile(r"clean|(linf|l2) (\d+(?:\.\d+)?(?:/\d+)?)")


def test_default_is_fare_convnext():
    spec = zoo.get_spec(zoo.DEFAULT_MODEL)
    assert spec.source == "hf-hub:chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg"
    assert (spec.method, spec.backbone, spec.image_size) == ("FARE", "ConvNeXt-B", 224)


def test_names_and_aliases_are_unique_and_typable():
    keys = [k for s in zoo.list_models() for k in (s.name, *s.aliases)]
    assert len(keys) == len({k.lower() for k in keys})
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


def test_every_published_number_is_sourced_in_range_and_from_the_vocabulary():
    seen = 0
    for spec in zoo.list_models():
        keys = [(r.benchmark, r.threat) for r in spec.published]
        assert len(keys) == len(set(keys)), spec.name  # one number per benchmark and threat
        for r in spec.published:
            seen += 1
            assert re.fullmatch(r"Table [IVX]+", r.source) or r.source in zoo.SOURCES, (spec.name, r)
            assert 0.0 <= r.value <= 100.0 and r.benchmark in BENCHMARKS and THREAT_RE.fullmatch(r.threat)
    assert seen > 0


def test_threat_keys_name_their_ball():
    for key, ball in zoo.THREATS.items():
        match = THREAT_RE.fullmatch(key)
        assert match, key
        if key == "clean":
            assert ball is None
        else:
            assert ball[0] == match.group(1) and ball[1] == pytest.approx(float(Fraction(match.group(2))))


def test_robust_never_above_clean():
    for spec in zoo.list_models():
        for r in spec.published:
            clean = spec.published_value(r.benchmark, "clean")
            if r.threat != "clean" and clean is not None:
                assert r.value <= clean.value, (spec.name, r)


def test_default_model_has_nights_clean_linf_l2_and_the_nights_view_agrees():
    spec = zoo.get_spec(zoo.DEFAULT_MODEL)
    for threat in ("clean", "linf 4/255", "l2 3"):
        assert spec.published_value("nights", threat) is not None, threat
    for s in zoo.list_models():
        expected = [s.published_value("nights", t) for t in ("clean", "linf 4/255", "l2 3")]
        assert [s.nights.clean, s.nights.linf, s.nights.l2] == [None if r is None else r.value for r in expected]


@pytest.mark.parametrize("args", [("nights", "clean", 101.0, "README"), ("nights", "clean", -1.0, "README"),
                                  ("imagenet", "clean", 50.0, "README"), ("nights", "linf 3/255", 50.0, "README"),
                                  ("nights", "clean", 50.0, "a blog post"), ("nights", "clean", 50.0, "Table 1")])
def test_published_result_refuses_what_is_outside_the_vocabulary(args):
    with pytest.raises(ValueError):
        zoo.PublishedResult(*args)


def test_unknown_name():
    with pytest.raises(zoo.UnknownModelError):
        zoo.get_spec("nope")


# The dataset, split and BAPPS subset `percept eval-2afc` evaluates for each benchmark it can measure
# (written out here from the paper's protocol; retrieval and NSFW numbers have no eval-2afc counterpart).
EVALUATED = {"nights": ("nights", "test", None), "nights_imagenet": ("nights", "test_imagenet", None),
             "nights_no_imagenet": ("nights", "test_no_imagenet", None), "bapps": ("bapps", "val", None),
             "things": ("things", None, None)} | {
    f"bapps_{s}": ("bapps", "val", s) for s in ("traditional", "cnn", "superres", "deblur", "color", "frameinterp")}


def _results_doc(spec, benchmark: str, threat: str, ours: float) -> dict:
    """A results document holding one number of ours for ``spec`` on ``benchmark`` under ``threat``."""
    from percept_cli.evaluation.results import SCHEMA

    dataset, split, group = EVALUATED[benchmark]
    ball = zoo.THREATS[threat]
    radii = [] if ball is None else [ball[1]]
    stats = {"clean": ours, "robust": [ours] * len(radii)}
    summary = {"overall": stats, "groups": {group: stats} if group else {}}
    return {"schema": SCHEMA, "dataset": {"name": dataset, "split": split, "n_triplets": 10},
            "attack": None if ball is None else {"norm": ball[0]}, "radii": radii,
            "models": {"run": {"model": {"name": spec.name, "zoo": spec.name}, "summary": summary}}}


MEASURABLE = [(spec, r) for spec in zoo.list_models() for r in spec.published if r.benchmark in EVALUATED]


def test_the_zoo_publishes_numbers_eval_2afc_can_measure():
    assert MEASURABLE and zoo.get_spec(zoo.DEFAULT_MODEL) in {spec for spec, _ in MEASURABLE}


def _case_id(value) -> str:
    return getattr(value, "name", None) or f"{value.benchmark}-{value.threat}".replace(" ", "-").replace("/", "_")


@pytest.mark.parametrize("spec, result", MEASURABLE, ids=_case_id)
def test_compare_paper_finds_every_published_number_it_can_measure(spec, result):
    from percept_cli.evaluation.paper import compare_with_paper

    report = compare_with_paper(_results_doc(spec, result.benchmark, result.threat, 0.5))
    (model,) = report["models"]
    rows = [r for r in model["rows"] if (r["benchmark"], r["threat"]) == (result.benchmark, result.threat)]
    assert len(rows) == 1, (result, model["rows"])
    assert (rows[0]["paper"], rows[0]["source"]) == (result.value, result.source)
    assert rows[0]["diff"] == pytest.approx(50.0 - result.value, abs=0.006)
