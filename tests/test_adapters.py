"""Fine-tuned models: trained run directories (percept_model.json + head), the paper authors' MLP heads
(Lightning .pt or .safetensors) and LoRA adapters (peft folders, merged into the weights), and their errors.

Expected values are computed independently: the head by hand from its tensors, the ConvNeXt adapter by
peft's own (unmerged) forward, the ViT adapter as ``W + scaling * B @ A`` on the original weight.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from percept_cli.cli.app import app
from percept_cli.errors import BadInputError, ModelFormatError
from percept_cli.io.preprocess import Preprocess
from percept_cli.metric import load_metric
from percept_cli.models import hub

EMBED_DIM = tiny_models.VIT_CFG["embed_dim"]  # 16, the tiny models' embedding width
HIDDEN = 8


def _normalized(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(tiny_models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_models.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _head_tensors(seed: int = 5, dim: int = EMBED_DIM, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(hidden, dim, generator=g), "fc1.bias": torch.randn(hidden, generator=g),
            "fc2.weight": torch.randn(dim, hidden, generator=g), "fc2.bias": torch.randn(dim, generator=g)}


def _apply_head(t: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """x + fc2(relu(fc1(x))), written out from the tensors."""
    hidden = torch.clamp(f @ t["fc1.weight"].T + t["fc1.bias"], min=0)
    return f + hidden @ t["fc2.weight"].T + t["fc2.bias"]


def _expected(model, tensors, x):
    with torch.no_grad():
        return _apply_head(tensors, model.visual(_normalized(x)))


def _run_dir(path: Path, base: Path, *, head=None, preprocess=None, record=None) -> Path:
    """A percept train run directory: the base model's files, head.safetensors, percept_model.json."""
    path.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(base / name, path / name)
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.items()}, str(path / "head.safetensors"))
    doc = record if record is not None else {
        "schema": "percept.model/1", "method": "2afc-mlp",
        "base": {"name": str(base), "location": str(base), "revision": None, "weights_sha256": None},
        "preprocess": preprocess,
        "head": {"type": "mlp", "file": "head.safetensors", "dim": EMBED_DIM, "hidden": HIDDEN},
        "lora": None, "percept_version": "0.1.0"}
    (path / "percept_model.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# -- trained run directories ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local-dir", "hub-cache"])
def test_trained_directory_loads_with_its_head_and_geometry(tiny_vit, empty_offline_hub, tmp_path, where):
    base, model = tiny_vit
    tensors = _head_tensors()
    run = _run_dir(tmp_path / "run", base, head=tensors, preprocess={"resize": 224, "crop": 0})
    name = str(run) if where == "local-dir" else "hf-hub:someone/trained-vit"
    if where == "hub-cache":
        tiny_models.add_to_hub_cache(empty_offline_hub, "someone/trained-vit", run)
        files = hub.fetch_model_files("someone/trained-vit")
        assert files.percept_config is not None and files.percept_config.parent == files.root
    metric = load_metric(name, device="cpu")
    assert metric.preprocess.as_dict() == Preprocess(224, crop=False).as_dict()  # the zoo/config default crops
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours = metric.encoder(x)
    torch.testing.assert_close(ours, _expected(model, tensors, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, metric.encoder.backbone(_normalized(x)), atol=1e-2)  # the head is there
    assert metric.source.head.endswith("head.safetensors") and metric.source.adapter is None
    assert not any(p.requires_grad for p in metric.parameters()) and not metric.encoder.head.training


def test_trained_directory_geometry_comes_from_the_record_and_overrides_win(tiny_vit, tmp_path):
    base, _ = tiny_vit
    run = _run_dir(tmp_path / "run", base, head=_head_tensors(), preprocess={"resize": 256, "crop": 224})
    assert load_metric(str(run), device="cpu").preprocess.as_dict() == Preprocess(224, resize=256).as_dict()
    overridden = load_metric(str(run), device="cpu", resize=224, crop=0)
    assert overridden.preprocess.as_dict() == Preprocess(224, crop=False).as_dict()


def test_trained_directory_without_head_or_preprocess_is_the_base_model(tiny_vit, tmp_path):
    base, model = tiny_vit
    record = {"schema": "percept.model/1", "method": "fare", "preprocess": None, "head": None,
              "lora": {"dir": "lora_adapter", "merged": True, "target_modules": ["c_fc"], "r": 4, "alpha": 8}}
    run = _run_dir(tmp_path / "run", base, record=record)
    metric = load_metric(str(run), device="cpu")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(metric.encoder(x), model.visual(_normalized(x)), atol=1e-5, rtol=1e-5)
    assert metric.source.head is None and metric.preprocess.as_dict() == Preprocess(224).as_dict()


def test_a_second_head_on_a_directory_with_one_is_refused(tiny_vit, tmp_path):
    base, _ = tiny_vit
    run = _run_dir(tmp_path / "run", base, head=_head_tensors(), preprocess={"resize": 224, "crop": 0})
    with pytest.raises(BadInputError, match="has its own head"):
        load_metric(str(run), device="cpu", head=run / "head.safetensors")


# -- the authors' MLP heads ----------------------------------------------------------------------------------
def test_authors_lightning_head_and_safetensors_heads_agree(tiny_vit, tmp_path):
    base, model = tiny_vit
    tensors = _head_tensors(seed=11)
    lightning = tmp_path / "mlp-vit-b-16-fare-eps4.pt"
    torch.save({"state_dict": {f"perceptual_model.mlp.{k}": v for k, v in tensors.items()}, "epoch": 3,
                "global_step": 120, "pytorch-lightning_version": "1.9.0"}, lightning)
    plain, prefixed = tmp_path / "head.safetensors", tmp_path / "prefixed.safetensors"
    save_file(tensors, str(plain))
    save_file({f"perceptual_model.mlp.{k}": v for k, v in tensors.items()}, str(prefixed))
    x = torch.rand(2, 3, 224, 224)
    expected = _expected(model, tensors, x)
    for path in (lightning, plain, prefixed):
        metric = load_metric(str(base), device="cpu", head=path)
        with torch.no_grad():
            torch.testing.assert_close(metric.encoder(x), expected, atol=1e-5, rtol=1e-5)
        assert metric.source.head == str(path)
        # the authors' preprocessing for their fine-tuned models: Resize((224, 224)), no crop
        assert metric.preprocess.as_dict() == Preprocess(224, crop=False).as_dict()
    with_override = load_metric(str(base), device="cpu", head=plain, resize=256, crop=224)
    assert with_override.preprocess.as_dict() == Preprocess(224, resize=256).as_dict()


def test_common_options_pass_head_and_lora(tiny_vit, tmp_path):
    import contextlib

    from percept_cli.cli.options import Common

    class Out:
        def status(self, _message):
            return contextlib.nullcontext()

    base, model = tiny_vit
    tensors = _head_tensors(seed=3)
    save_file(tensors, str(tmp_path / "head.safetensors"))
    common = Common(model=str(base), device="cpu", head=tmp_path / "head.safetensors")
    metric = common.load_metric(Out())
    assert metric.source.head == str(tmp_path / "head.safetensors")
    judge = common.load_metric(Out(), str(base), geometry=False)  # a second model keeps none of --model's files
    assert judge.source.head is None
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(metric.encoder(x), _expected(model, tensors, x), atol=1e-5, rtol=1e-5)


# -- LoRA adapters -------------------------------------------------------------------------------------------
class _Wrapper(nn.Module):
    """The authors' wrapper: a module holding the OpenCLIP vision tower as ``.model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


# (tower config, how the authors chose LoRA's targets): timm's convnext_atto has 1x1-convolution MLPs
# (convnext_base_w's are Linear layers); the ViT case puts LoRA on OpenCLIP's Linear MLP layers.
PEFT_CASES = {"convnext": (tiny_models.CONVNEXT_CFG, ("fc1", "fc2")),
              "vit-mlp": (tiny_models.VIT_CFG, ("c_fc", "c_proj"))}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_merges_to_peft_forward(tmp_path, case, rslora):
    peft = pytest.importorskip("peft")
    cfg, words = PEFT_CASES[case]
    base = tmp_path / case
    model = tiny_models.save_open_clip_dir(base, cfg, seed=1)
    tower = copy.deepcopy(model.visual).eval()
    targets = [n for n, _ in tower.named_modules() if any(w in n for w in words)]
    config = peft.LoraConfig(r=4, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=targets,
                             use_rslora=rslora)
    peft_model = peft.get_peft_model(_Wrapper(tower), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 2.0)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "lora"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is rslora
    metric = load_metric(str(base), device="cpu", adapter=tmp_path / "lora")
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = metric.encoder(x), peft_model(_normalized(x))
        plain = model.visual(_normalized(x))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()  # the adapter changed something
    assert metric.source.adapter == str(tmp_path / "lora")
    assert metric.preprocess.as_dict() == Preprocess(224, crop=False).as_dict()
    if case == "vit-mlp":  # no qkv adapter from a DINO ViT: OpenCLIP's LayerNorm eps is kept
        assert metric.encoder.backbone.ln_post.eps == 1e-5


def _vit_qkv_adapter(directory: Path, width: int, r: int = 4, alpha: float = 0.5, seed: int = 9, **config):
    """An authors'-style ViT adapter (LoRA on a DINO ViT's blocks.0.attn.qkv), written by hand."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, width, generator=g), torch.randn(3 * width, r, generator=g)
    prefix = "base_model.model.model.blocks.0.attn.qkv"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
              str(directory / "adapter_model.safetensors"))
    doc = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.3, "bias": "none",
           "target_modules": ["qkv"], "use_dora": False, "use_rslora": False, **config}
    (directory / "adapter_config.json").write_text(json.dumps(doc))
    return a, b


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_vit_qkv_adapter_merges_into_in_proj_weight(tiny_vit, tmp_path, rslora):
    base, model = tiny_vit
    width = tiny_models.VIT_CFG["vision_cfg"]["width"]
    a, b = _vit_qkv_adapter(tmp_path / "lora-vit", width, use_rslora=rslora)
    scaling = 0.5 / (math.sqrt(4) if rslora else 4)
    metric = load_metric(str(base), device="cpu", adapter=tmp_path / "lora-vit")
    tower, original = metric.encoder.backbone, model.visual
    block, block0 = tower.transformer.resblocks[0], original.transformer.resblocks[0]
    assert torch.equal(block.attn.in_proj_weight, block0.attn.in_proj_weight + scaling * (b @ a))
    assert torch.equal(block.attn.in_proj_bias, block0.attn.in_proj_bias)
    assert torch.equal(block.attn.out_proj.weight, block0.attn.out_proj.weight)
    assert torch.equal(block.mlp.c_fc.weight, block0.mlp.c_fc.weight)
    # the authors ran these models as a DINO ViT: norms with eps 1e-6, its ln_pre stand-in at torch's 1e-5
    assert block.ln_1.eps == block.ln_2.eps == tower.ln_post.eps == 1e-6 and tower.ln_pre.eps == 1e-5
    assert original.ln_post.eps == 1e-5


def test_unmerged_lora_of_a_trained_directory_is_merged(tiny_vit, tmp_path):
    base, model = tiny_vit
    width = tiny_models.VIT_CFG["vision_cfg"]["width"]
    record = {"schema": "percept.model/1", "method": "2afc-lora", "preprocess": {"resize": 224, "crop": 0},
              "head": None, "lora": {"dir": "lora_adapter", "merged": False, "r": 4, "alpha": 0.5}}
    run = _run_dir(tmp_path / "run", base, record=record)
    a, b = _vit_qkv_adapter(run / "lora_adapter", width)
    metric = load_metric(str(run), device="cpu")
    w0 = model.visual.transformer.resblocks[0].attn.in_proj_weight
    assert torch.equal(metric.encoder.backbone.transformer.resblocks[0].attn.in_proj_weight,
                       w0 + 0.125 * (b @ a))


# -- errors --------------------------------------------------------------------------------------------------
class _NotATensor:
    """A custom object in a pickle: weights-only loading refuses it."""


def _bad_input(kind: str, base: Path, tmp: Path) -> tuple[dict, str]:
    """(load_metric keyword arguments, the file name the error must name) for one kind of bad input."""
    run = tmp / "run"
    if kind == "malformed-json":
        _run_dir(run, base, record="{not json")
        return {"model": str(run)}, "percept_model.json"
    if kind == "wrong-schema":
        _run_dir(run, base, record={"schema": "percept.model/9", "head": None})
        return {"model": str(run)}, "percept_model.json"
    if kind == "missing-head-file":
        _run_dir(run, base, head=None, preprocess={"resize": 224, "crop": 0})
        return {"model": str(run)}, "head.safetensors"
    if kind == "head-of-wrong-width":
        _run_dir(run, base, head=_head_tensors(dim=EMBED_DIM + 4), preprocess={"resize": 224, "crop": 0})
        return {"model": str(run)}, "head.safetensors"
    if kind == "not-a-head":
        save_file({"weight": torch.zeros(2, 2)}, str(tmp / "other.safetensors"))
        return {"model": str(base), "head": tmp / "other.safetensors"}, "other.safetensors"
    if kind == "pickled-object":
        torch.save({"state_dict": _head_tensors(), "args": _NotATensor()}, tmp / "mlp.pt")
        return {"model": str(base), "head": tmp / "mlp.pt"}, "mlp.pt"
    if kind == "adapter-key-matches-nothing":
        (tmp / "lora").mkdir()
        save_file({"base_model.model.model.nothing.here.lora_A.weight": torch.zeros(4, 32),
                   "base_model.model.model.nothing.here.lora_B.weight": torch.zeros(32, 4)},
                  str(tmp / "lora" / "adapter_model.safetensors"))
        (tmp / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 1}))
        return {"model": str(base), "adapter": tmp / "lora"}, "lora"
    if kind == "dora-adapter":
        _vit_qkv_adapter(tmp / "lora", 32, use_dora=True)
        return {"model": str(base), "adapter": tmp / "lora"}, "adapter_config.json"
    raise AssertionError(kind)


BAD_INPUTS = ["malformed-json", "wrong-schema", "missing-head-file", "head-of-wrong-width", "not-a-head",
              "pickled-object", "adapter-key-matches-nothing", "dora-adapter"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_fine_tuning_files_are_one_clear_error(tiny_vit, tmp_path, kind):
    kwargs, named = _bad_input(kind, tiny_vit[0], tmp_path)
    with pytest.raises(ModelFormatError) as info:
        load_metric(device="cpu", **kwargs)
    message = str(info.value)
    assert named in message and "\n" not in message, message


@pytest.mark.parametrize("kind", ["malformed-json", "missing-head-file", "head-of-wrong-width"])
def test_bad_trained_directory_through_the_cli(tiny_vit, image_dir, tmp_path, kind):
    kwargs, named = _bad_input(kind, tiny_vit[0], tmp_path)
    result = CliRunner().invoke(app, ["distance", str(image_dir / "a.png"), str(image_dir / "b.png"),
                                      "--model", kwargs["model"], "--device", "cpu"])
    assert result.exit_code == 2, result.output  # ModelFormatError is a BadInputError: exit 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr


def test_hub_snapshot_without_its_head_file_is_refused(tiny_vit, empty_offline_hub, tmp_path):
    run = _run_dir(tmp_path / "run", tiny_vit[0], head=None, preprocess={"resize": 224, "crop": 0})
    tiny_models.add_to_hub_cache(empty_offline_hub, "someone/headless", run)
    with pytest.raises(ModelFormatError, match="head.safetensors"):
        load_metric("hf-hub:someone/headless", device="cpu")


@pytest.mark.parametrize("refresh", [False, True], ids=["cached", "from-the-hub"])
def test_hub_fetches_the_record_and_its_head_as_it_fetches_the_weights(tiny_vit, empty_offline_hub, tmp_path,
                                                                        monkeypatch, refresh):
    from huggingface_hub import constants

    run = _run_dir(tmp_path / "run", tiny_vit[0], head=_head_tensors(), preprocess={"resize": 224, "crop": 0})
    tiny_models.add_to_hub_cache(empty_offline_hub, "someone/trained", run)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, as on a user's machine
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: refresh or pytest.fail("the Hub was asked for a cached model"))
    calls, real = [], hub._download

    def spy(repo_id, filename, revision, local_only):
        calls.append((filename, local_only))
        return real(repo_id, filename, revision, True)  # served from the cache: no network in tests

    monkeypatch.setattr(hub, "_download", spy)
    files = hub.fetch_model_files("someone/trained", refresh=refresh)
    assert files.percept_config == files.root / "percept_model.json"
    assert ("percept_model.json", not refresh) in calls and ("head.safetensors", not refresh) in calls
