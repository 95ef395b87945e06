"""Loading models: local Hub-layout dirs, the Hub cache offline, checkpoints, safe unpickling."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
import torch.nn.functional as F

from percept_cli.errors import BadInputError, ModelFormatError, ModelUnavailableError
from percept_cli.models import zoo
from percept_cli.models.loading import describe_model, load_encoder, read_state_dict
from percept_cli.models.naming import parse_model_name


def _direct_embedding(model, x):
    mean = torch.tensor(tiny_models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_models.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image((x - mean) / std)


def test_local_dir_matches_direct_open_clip(tiny_vit):
    directory, model = tiny_vit
    encoder, source = load_encoder(parse_model_name(str(directory)))
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        ours = encoder(x)
    torch.testing.assert_close(ours, _direct_embedding(model, x), atol=1e-5, rtol=1e-5)
    assert source.kind == "local-dir" and source.family == "open_clip"
    assert encoder.image_size == 224
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("spec", zoo.list_models(), ids=lambda s: s.name)
def test_every_zoo_entry_loads_from_offline_hub_cache(offline_hub, spec):
    encoder, source = load_encoder(parse_model_name(spec.name))
    assert source.kind == "hf-hub" and source.location == spec.repo_id
    assert source.family == spec.family
    assert source.revision and len(source.revision) == 40
    assert str(offline_hub) in source.weights
    with torch.no_grad():
        emb = encoder(torch.rand(2, 3, spec.image_size, spec.image_size))
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()


def test_hub_cache_model_equals_local_model(offline_hub, tiny_vit, tmp_path):
    directory, model = tiny_vit
    tiny_models.add_to_hub_cache(offline_hub, "someone/tiny-vit", directory, commit="a" * 40)
    encoder, source = load_encoder(parse_model_name("hf-hub:someone/tiny-vit"))
    assert source.revision == "a" * 40
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), _direct_embedding(model, x), atol=1e-5, rtol=1e-5)


def test_uncached_model_offline_is_one_clear_error(empty_offline_hub):
    with pytest.raises(ModelUnavailableError) as info:
        load_encoder(parse_model_name("rclip-f-convnext-b"))
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message
    assert "percept models download" in message and str(empty_offline_hub) in message
    assert "\n" not in message


def test_bin_weights_load_weights_only(tiny_vit, tmp_path):
    _, model = tiny_vit
    target = tmp_path / "bin-model"
    tiny_models.save_open_clip_dir(target, tiny_models.VIT_CFG, seed=0, weights_name="open_clip_pytorch_model.bin")
    encoder, source = load_encoder(parse_model_name(str(target)))
    assert source.weights.endswith(".bin")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), _direct_embedding(model, x), atol=1e-5, rtol=1e-5)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, path)
    with pytest.raises(ModelFormatError, match="weights_only"):
        read_state_dict(path)


def test_state_dict_unwrapping(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module.a": torch.ones(1), "module.b": torch.zeros(1)}}, path)
    assert set(read_state_dict(path)) == {"a", "b"}


def test_arch_plus_visual_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(4)
    model = open_clip.create_model("ViT-B-32", pretrained=None, load_weights=False)
    visual_state = {k: v.contiguous() for k, v in model.visual.state_dict().items()}
    ckpt = tmp_path / "visual.safetensors"
    save_file(visual_state, str(ckpt))
    encoder, source = load_encoder(parse_model_name("ViT-B-32", checkpoint=ckpt))
    assert source.kind == "checkpoint"
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        direct = model.visual((x - encoder.mean) / encoder.std)
        torch.testing.assert_close(encoder(x), direct, atol=1e-5, rtol=1e-5)
    # a full-model checkpoint (visual.* keys, .pt) loads the same vision tower
    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    encoder2, _ = load_encoder(parse_model_name("ViT-B-32", checkpoint=full))
    with torch.no_grad():
        torch.testing.assert_close(encoder2(x), direct, atol=1e-5, rtol=1e-5)


def test_checkpoint_for_wrong_arch_is_clear(tmp_path):
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ModelFormatError, match="does not match architecture"):
        load_encoder(parse_model_name("ViT-B-32", checkpoint=tmp_path / "w.pt"))


def test_directory_without_model_files(tmp_path):
    with pytest.raises(ModelFormatError, match="not a model directory"):
        load_encoder(parse_model_name(str(tmp_path)))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_models.VIT_CFG}))
    with pytest.raises(ModelFormatError, match="no weights file"):
        load_encoder(parse_model_name(str(tmp_path)))


def test_weights_that_do_not_fit_config(tiny_vit, tmp_path):
    directory, _ = tiny_vit
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    cfg["model_cfg"]["embed_dim"] = 24
    (tmp_path / "m" / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="do not fit"):
        load_encoder(parse_model_name(str(tmp_path / "m")))


def test_bf16_encoder_close_to_fp32(tiny_vit):
    directory, _ = tiny_vit
    ref = parse_model_name(str(directory))
    fp32, _ = load_encoder(ref)
    bf16, _ = load_encoder(ref, dtype=torch.bfloat16)
    assert bf16.compute_dtype == torch.bfloat16 and bf16.mean.dtype == torch.float32
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        a, b = F.normalize(fp32(x), dim=-1), F.normalize(bf16(x), dim=-1)
    assert b.dtype == torch.float32
    assert float((a * b).sum(-1).min()) > 0.98


def test_describe_cached_and_uncached(offline_hub, empty_offline_hub):
    info = describe_model("rclip-t-vit-b16")
    assert info["present"] is False and info["revision"] is None
    assert info["source"] == "hf-hub:chs20/TeCoA4-ViT-B-16-laion2B-s34B-b88K"


def test_describe_cached(offline_hub):
    info = describe_model("rclip-t-vit-b16")
    assert info["present"] is True and len(info["revision"]) == 40
    assert info["path"].startswith(str(offline_hub))
    spec = zoo.get_spec("rclip-t-vit-b16")
    for key, threat in (("clean", "clean"), ("linf", "linf 4/255"), ("l2", "l2 3")):
        published = spec.published_value("nights", threat)  # the zoo's published list, not a copied number
        assert info["nights"][key] == (None if published is None else published.value), key
    assert info["nights"]["clean"] is not None


def test_bad_hub_id():
    with pytest.raises(BadInputError, match="not a valid Hub model id"):
        parse_model_name("hf-hub:not a repo")


def test_weights_only_repo_uses_builtin_arch(offline_hub, tmp_path):
    """OpenAI CLIP repos on the Hub hold OpenCLIP weights but no open_clip_config.json."""
    import dataclasses

    import open_clip

    from percept_cli.models.naming import ModelRef

    config = tmp_path / "percept-tiny-builtin.json"
    config.write_text(json.dumps(tiny_models.VIT_CFG))
    open_clip.add_model_config(config)
    source_dir = tmp_path / "weights-only"
    model = tiny_models.save_open_clip_dir(source_dir, tiny_models.VIT_CFG, seed=7)
    (source_dir / "open_clip_config.json").unlink()
    tiny_models.add_to_hub_cache(offline_hub, "openai-like/weights-only", source_dir)
    spec = dataclasses.replace(zoo.get_spec("clip-vit-l14"), source="hf-hub:openai-like/weights-only",
                               arch="percept-tiny-builtin")
    encoder, _ = load_encoder(ModelRef("hf-hub", "openai-like/weights-only", "x", spec=spec))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), _direct_embedding(model, x), atol=1e-5, rtol=1e-5)
    # without a built-in architecture the same repo is refused with a clear message
    with pytest.raises(BadInputError, match="open_clip_config.json"):
        load_encoder(parse_model_name("hf-hub:openai-like/weights-only"))


# --- timm ViTs: how tokens become the embedding (pooling), and mean/std from the config ---------

CUSTOM_MEAN, CUSTOM_STD = (0.3, 0.6, 0.2), (0.5, 0.1, 0.35)  # not ImageNet's: a swap or default shows


def _normalised(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _last_block_class_token(model, x):
    """The class token the last transformer block outputs (a forward hook, as DreamSim extracts it)."""
    seen = {}
    handle = model.blocks[-1].register_forward_hook(lambda module, inputs, output: seen.update(tokens=output))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["tokens"][:, 0]


def _timm_output(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x))


@pytest.fixture(scope="module")
def custom_norm_timm(tmp_path_factory):
    """(directory, model): a tiny timm ViT whose config.json states a non-ImageNet mean/std."""
    directory = tmp_path_factory.mktemp("timm-custom-norm")
    model = tiny_models.save_timm_dir(directory, seed=11, config=tiny_models.timm_config(CUSTOM_MEAN, CUSTOM_STD))
    return directory, model


def test_cls_prenorm_is_the_last_blocks_class_token(custom_norm_timm):
    directory, model = custom_norm_timm
    encoder, source = load_encoder(parse_model_name(str(directory)), pooling="cls_prenorm")
    x = torch.rand(2, 3, 224, 224)
    inputs = _normalised(x, CUSTOM_MEAN, CUSTOM_STD)
    expected = _last_block_class_token(model, inputs)
    with torch.no_grad():
        ours = encoder(x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, _timm_output(model, inputs), atol=1e-3)  # the final norm does change it
    assert source.pooling == "cls_prenorm"


@pytest.mark.parametrize("pooling", ["token", None])
def test_token_pooling_is_timms_own_output(custom_norm_timm, pooling):
    directory, model = custom_norm_timm
    encoder, source = load_encoder(parse_model_name(str(directory)), pooling=pooling)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), _timm_output(model, _normalised(x, CUSTOM_MEAN, CUSTOM_STD)),
                                   atol=1e-5, rtol=1e-5)
    assert source.pooling == "token"


@pytest.mark.parametrize("pooling", ["cls_prenorm", "token"])
def test_local_timm_dir_through_load_metric_uses_its_mean_std_and_pooling(custom_norm_timm, pooling):
    """The public path (load_metric, embed, metric(x, y)) against a direct timm forward of the same weights."""
    from percept_cli import load_metric

    directory, model = custom_norm_timm
    metric = load_metric(str(directory), device="cpu", pooling=pooling)
    direct = _last_block_class_token if pooling == "cls_prenorm" else _timm_output
    x, y = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224)
    ex, ey = (direct(model, _normalised(v, CUSTOM_MEAN, CUSTOM_STD)) for v in (x, y))
    torch.testing.assert_close(metric.embed(x, normalize=False), ex, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(metric(x, y), 1 - F.cosine_similarity(ex, ey, dim=-1), atol=1e-5, rtol=1e-5)
    assert metric.source.pooling == pooling


def test_timm_config_without_mean_std_uses_imagenet_constants(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = tiny_models.save_timm_dir(tmp_path / "m", seed=12, config=tiny_models.timm_config())
    encoder, _ = load_encoder(parse_model_name(str(tmp_path / "m")))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model(_normalised(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)),
                                   atol=1e-5, rtol=1e-5)


def test_dino_zoo_entry_embeds_as_dreamsim(offline_hub):
    """DreamSim's DINO: Resize((224,224)) bicubic, ImageNet mean/std, class token before the final norm."""
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    from percept_cli import load_metric

    metric = load_metric("dino-vit-b16", device="cpu")
    assert metric.source.pooling == "cls_prenorm"
    cfg = tiny_models.TIMM_VIT_CFG
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"]).eval()
    model.load_state_dict(load_file(metric.source.weights))  # the stand-in's weights, in a model of our own
    img = Image.fromarray((torch.rand(90, 150, 3) * 255).to(torch.uint8).numpy(), "RGB")
    dreamsim_preprocess = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor()])
    inputs = _normalised(dreamsim_preprocess(img).unsqueeze(0), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(metric.embed(img, normalize=False), _last_block_class_token(model, inputs),
                               atol=1e-5, rtol=1e-5)
    # the zoo's choice can be overridden: timm's own (post-norm) output
    token = load_metric("dino-vit-b16", device="cpu", pooling="token")
    assert token.source.pooling == "token"
    torch.testing.assert_close(token.embed(img, normalize=False), _timm_output(model, inputs), atol=1e-5, rtol=1e-5)


def test_models_info_shows_pooling(offline_hub):
    assert describe_model("dino-vit-b16")["pooling"] == "cls_prenorm"


@pytest.mark.parametrize("case", ["unknown", "open_clip", "not-a-vit", "avg-pooled-vit"])
def test_pooling_that_cannot_apply_is_refused(case, tiny_vit, tmp_path):
    if case == "unknown":
        directory, pooling = tiny_vit[0], "mean-of-everything"
    elif case == "open_clip":
        directory, pooling = tiny_vit[0], "cls_prenorm"
    else:
        if case == "not-a-vit":
            config = tiny_models.timm_config(architecture="convnext_atto",
                                             model_args={"dims": [8, 8, 8, 8], "depths": [1, 1, 1, 1]})
            config["pretrained_cfg"]["classifier"] = "head.fc"  # timm's classifier name for ConvNeXt
        else:
            avg_pooled = {**tiny_models.TIMM_VIT_CFG["model_args"], "global_pool": "avg"}
            config = tiny_models.timm_config(model_args=avg_pooled)
        directory, pooling = tmp_path / case, "cls_prenorm"
        tiny_models.save_timm_dir(directory, seed=0, config=config)
    with pytest.raises(BadInputError, match=f"pooling '{pooling}'"):
        load_encoder(parse_model_name(str(directory)), pooling=pooling)


# --- OpenAI-derived ViT-L/14: QuickGELU or nothing -------------------------------------------------

def _openai_l14_like(offline_hub, tmp_path, model_cfg, name):
    """A tiny repo standing in for an OpenAI-derived L/14 zoo entry; returns (ModelRef, saved model)."""
    import dataclasses

    from percept_cli.models.naming import ModelRef

    model = tiny_models.save_open_clip_dir(tmp_path / name, model_cfg, seed=8)
    tiny_models.add_to_hub_cache(offline_hub, f"openai-like/{name}", tmp_path / name)
    spec = dataclasses.replace(zoo.get_spec("rclip-f4-vit-l14"), source=f"hf-hub:openai-like/{name}")
    return ModelRef("hf-hub", f"openai-like/{name}", spec.name, spec=spec), model


def test_openai_derived_l14_with_gelu_config_still_runs_quick_gelu(offline_hub, tmp_path):
    """A zoo entry's Hub config that omits quick_gelu must not make OpenAI-derived weights run with GELU."""
    from open_clip.model import CLIP

    ref, model = _openai_l14_like(offline_hub, tmp_path, tiny_models.VIT_CFG, "gelu-config")
    encoder, _ = load_encoder(ref)
    quick = CLIP(**tiny_models.VIT_QUICKGELU_CFG).eval()  # the same weights, run as OpenAI's CLIP runs them
    quick.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), _direct_embedding(quick, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(encoder(x), _direct_embedding(model, x), atol=1e-4)  # GELU differs


def test_quick_gelu_safety_net_refuses_a_gelu_tower(offline_hub, tmp_path, monkeypatch):
    """If the build ever ignores the forced QuickGELU, loading stops instead of giving wrong numbers."""
    from percept_cli.models import openclip

    ref, _ = _openai_l14_like(offline_hub, tmp_path, tiny_models.VIT_CFG, "gelu-config-2")
    real_config = openclip.open_clip_config
    monkeypatch.setattr(openclip, "open_clip_config", lambda path, arch, quick_gelu=False: real_config(path, arch))
    with pytest.raises(ModelFormatError, match="QuickGELU") as info:
        load_encoder(ref)
    assert '"quick_gelu": true' in str(info.value)


def test_openai_derived_l14_with_quick_gelu_config_loads(offline_hub, tmp_path):
    from open_clip.model import CLIP

    ref, model = _openai_l14_like(offline_hub, tmp_path, tiny_models.VIT_QUICKGELU_CFG, "quickgelu-config")
    encoder, _ = load_encoder(ref)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours = encoder(x)
        torch.testing.assert_close(ours, _direct_embedding(model, x), atol=1e-5, rtol=1e-5)
        gelu = CLIP(**tiny_models.VIT_CFG).eval()  # the same weights with GELU: silently different numbers
        gelu.load_state_dict(model.state_dict())
        assert not torch.allclose(ours, _direct_embedding(gelu, x), atol=1e-4)


@pytest.mark.parametrize("spec", [s for s in zoo.list_models() if s.backbone == "ViT-L/14"], ids=lambda s: s.name)
def test_zoo_l14_entries_use_openais_quick_gelu_arch(spec):
    import open_clip

    assert open_clip.get_model_config(spec.arch)["quick_gelu"] is True


# --- logging: open_clip's and timm's build chatter is silenced, nothing else --------------------

def _logs_like_user_code(real):
    """``real``, preceded by log calls from the user's own code (a named logger and the root logger)."""
    def wrapped(*args, **kwargs):
        logging.getLogger("my_app").warning("my_app: still heard while a model builds")
        logging.warning("root: still heard while a model builds")  # noqa: LOG015 (user code may do this)
        logging.getLogger("timm.models._builder").info("timm: build chatter")  # timm's own logger
        return real(*args, **kwargs)
    return wrapped


def test_loading_silences_library_chatter_but_not_the_users_logs(tiny_vit, tmp_path, caplog, monkeypatch):
    import open_clip
    import timm
    from open_clip import model as clip_model

    tiny_models.save_timm_dir(tmp_path / "timm", seed=0)
    monkeypatch.setattr(clip_model, "_build_vision_tower", _logs_like_user_code(clip_model._build_vision_tower))
    monkeypatch.setattr(timm, "create_model", _logs_like_user_code(timm.create_model))
    open_clip_dir = Path(open_clip.__file__).resolve().parent

    def library_records():
        return [r for r in caplog.records if r.name.startswith("timm")
                or Path(r.pathname).resolve().is_relative_to(open_clip_dir)]

    with caplog.at_level(logging.DEBUG):
        load_encoder(parse_model_name(str(tiny_vit[0])))
        load_encoder(parse_model_name(str(tmp_path / "timm")))
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("my_app: still heard while a model builds") == 2
    assert messages.count("root: still heard while a model builds") == 2
    assert library_records() == []
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # the same build outside percept's loading does chatter
        open_clip.create_model(f"local-dir:{tiny_vit[0]}", pretrained=None, load_weights=False)
    assert any("initialized randomly" in r.getMessage() for r in library_records())
    assert any(r.name == "timm.models._builder" for r in library_records())


def test_loading_leaves_an_unconfigured_root_logger_unconfigured(tiny_vit, monkeypatch):
    """open_clip's module-level ``logging.info`` would otherwise run basicConfig() and make a user's
    own later ``logging.basicConfig(...)`` a silent no-op."""
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "filters", [])
    load_encoder(parse_model_name(str(tiny_vit[0])))
    assert logging.root.handlers == [] and logging.root.filters == []
    assert logging.getLogger("timm").level == logging.NOTSET


# --- built without random initialisation: the same model as open_clip's and timm's own loading ------

def _open_clip_reference(directory: Path):
    """The model open_clip's own path builds and loads from ``directory`` (random init, then weights), in eval
    mode and frozen as percept runs models (frozen attention takes PyTorch's fused path: other last bits)."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{directory}", pretrained=None, load_weights=False,
                                   pretrained_text=False)
    weights = next(directory / name for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                   if (directory / name).is_file())
    open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    return model.eval().requires_grad_(False)


def _tensors_equal(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert not tensor.is_meta, name
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor.cpu(), reference[name]), name


@pytest.mark.parametrize("case", ["vit", "vit-quickgelu", "convnext", "vit-fp16-weights", "vit-bin", "vit-other-grid"])
def test_vision_tower_is_open_clips_own_loading_bit_for_bit(case, tmp_path, device):
    cfg = {"vit": tiny_models.VIT_CFG, "vit-quickgelu": tiny_models.VIT_QUICKGELU_CFG,
           "convnext": tiny_models.CONVNEXT_CFG}.get(case, tiny_models.VIT_CFG)
    weights_name = "open_clip_pytorch_model.bin" if case == "vit-bin" else "open_clip_model.safetensors"
    tiny_models.save_open_clip_dir(tmp_path / case, cfg, seed=21, weights_name=weights_name)
    if case == "vit-fp16-weights":  # half-precision files: parameters still fp32, as a copying load gives
        from safetensors.torch import load_file, save_file

        path = str(tmp_path / case / weights_name)
        save_file({k: v.half() for k, v in load_file(path).items()}, path)
    if case == "vit-other-grid":  # weights for a 7x7 patch grid, config for 8x8: open_clip resizes the grid
        config_path = tmp_path / case / "open_clip_config.json"
        config = json.loads(config_path.read_text())
        config["model_cfg"]["vision_cfg"]["image_size"] = 256
        config_path.write_text(json.dumps(config))
    reference = _open_clip_reference(tmp_path / case).to(device)
    encoder, _ = load_encoder(parse_model_name(str(tmp_path / case)), device=device)
    _tensors_equal(dict([*encoder.backbone.named_parameters(), *encoder.backbone.named_buffers()]),
                   {k: v.cpu() for k, v in [*reference.visual.named_parameters(), *reference.visual.named_buffers()]})
    if device == "cpu":  # as torch allocates: MKL/oneDNN round differently on unaligned weights of large layers
        assert all(p.data_ptr() % 64 == 0 for p in encoder.backbone.parameters())
    size = encoder.image_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ours, theirs = encoder(x), reference.encode_image(encoder.normalize(x))
    if device == "cpu":
        assert torch.equal(ours, theirs)
    else:  # GPU kernels need not be bit-reproducible between two model instances
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_text_tower_and_its_computed_attention_mask_match_open_clip(tiny_vit):
    """The causal attention mask is computed in the constructor and in no checkpoint: it must survive."""
    from percept_cli import load_metric

    directory, _ = tiny_vit
    metric = load_metric(str(directory), device="cpu", with_text=True)
    reference = _open_clip_reference(directory)
    clip = metric.text_encoder.model
    _tensors_equal(dict([*clip.named_parameters(), *clip.named_buffers()]),
                   dict([*reference.named_parameters(), *reference.named_buffers()]))
    length = tiny_models.TEXT_CFG["context_length"]
    causal = torch.full((length, length), float("-inf")).triu(1)  # position i sees positions <= i only
    assert torch.equal(clip.attn_mask, causal)
    prompts = ["a photo of a cat", "a diagram"]
    import open_clip

    tokens = open_clip.get_tokenizer(f"local-dir:{directory}")(prompts)
    with torch.no_grad():
        expected = F.normalize(reference.encode_text(tokens).float(), dim=-1)
    assert torch.equal(metric.embed_text(prompts), expected)


def test_timm_buffers_computed_at_build_time_survive(tmp_path):
    """Swin's relative-position index is a buffer no checkpoint holds; the loaded model must still have it."""
    import timm

    config = tiny_models.timm_config(architecture="swin_tiny_patch4_window7_224",
                                     model_args={"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                                 "img_size": 56, "window_size": 7})
    config["pretrained_cfg"]["input_size"] = [3, 56, 56]
    config["pretrained_cfg"]["classifier"] = "head.fc"
    model = tiny_models.save_timm_dir(tmp_path / "swin", seed=5, config=config)
    reference = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    reference.load_state_dict(model.state_dict())  # rebuilt the ordinary way: its own computed buffers
    encoder, _ = load_encoder(parse_model_name(str(tmp_path / "swin")))
    buffers = dict(encoder.backbone.named_buffers())
    assert any(name.endswith("relative_position_index") for name in buffers)
    _tensors_equal(buffers, dict(reference.eval().named_buffers()))
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(encoder(x), reference(encoder.normalize(x)))


def test_loaded_weights_do_not_depend_on_the_file_afterwards(tiny_vit, tmp_path):
    """Rewriting the weights file in place (a training loop saving over it) leaves a loaded model as it was."""
    shutil.copytree(tiny_vit[0], tmp_path / "m")
    encoder, _ = load_encoder(parse_model_name(str(tmp_path / "m")))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        before = encoder(x)
    weights_file = tmp_path / "m" / "open_clip_model.safetensors"
    with open(weights_file, "r+b") as file:  # same inode, zeroed and truncated
        size = file.seek(0, 2)
        file.seek(0)
        file.write(bytes(size))
        file.truncate(size // 2)
    with torch.no_grad():
        assert torch.equal(encoder(x), before)


def test_safetensors_reading_matches_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"module.f32": torch.randn(3, 5), "module.f16": torch.randn(7).half(),
               "module.bf16": torch.randn(2, 2).bfloat16(), "module.i64": torch.arange(6).view(2, 3),
               "module.flags": torch.tensor([True, False, True]), "module.scalar": torch.tensor(2.5),
               "module.empty": torch.zeros(0, 4), "module.visual.x": torch.randn(4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    expected = {k[len("module."):]: v for k, v in load_file(str(tmp_path / "w.safetensors")).items()}
    ours = read_state_dict(tmp_path / "w.safetensors")
    _tensors_equal(ours, expected)
    from percept_cli.models.weights import tower

    assert set(read_state_dict(tmp_path / "w.safetensors", select=tower("visual."))) == {"visual.x"}
    assert set(read_state_dict(tmp_path / "w.safetensors", select=tower("text."))) == set(expected)


def test_building_on_meta_leaves_other_threads_and_later_builds_alone():
    import threading

    from torch import nn

    from percept_cli.models.weights import parameters_on_meta

    other = {}
    with parameters_on_meta():
        inside = nn.Linear(3, 3)
        thread = threading.Thread(target=lambda: other.update(model=nn.Linear(3, 3)))
        thread.start()
        thread.join()
    assert inside.weight.is_meta
    assert not other["model"].weight.is_meta and other["model"].weight.abs().sum() > 0  # initialised
    after = nn.Linear(3, 3)
    assert not after.weight.is_meta and after.weight.abs().sum() > 0


def test_a_module_that_reads_its_parameters_while_built_is_built_the_ordinary_way():
    from torch import nn

    from percept_cli.models.weights import build_without_init

    class ReadsItsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.full((1,), 3.0))
            self.factor = float(self.scale.detach()) * 2  # impossible on the meta device

    module = build_without_init(ReadsItsWeight)
    assert not module.scale.is_meta and module.factor == 6.0
