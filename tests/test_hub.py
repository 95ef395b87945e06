"""Hub access is cache-first, fails fast when the Hub cannot be reached, and prefers .safetensors."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from percept_cli.errors import ModelUnavailableError
from percept_cli.models import hub
from percept_cli.models.loading import load_encoder
from percept_cli.models.naming import parse_model_name


@pytest.fixture
def online_mode(monkeypatch):
    """HF_HUB_OFFLINE unset, as on a user's machine."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _record_downloads(monkeypatch):
    calls = []
    real = hub._download

    def spy(repo_id, filename, revision, local_only):
        calls.append((filename, local_only))
        return real(repo_id, filename, revision, True)  # never touch the network in tests

    monkeypatch.setattr(hub, "_download", spy)
    return calls


def test_cached_model_needs_no_network(offline_hub, online_mode, monkeypatch):
    calls = _record_downloads(monkeypatch)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: pytest.fail("the Hub was contacted for a cached model"))
    files = hub.fetch_model_files("chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg", family=hub.OPEN_CLIP)
    assert files.weights_path.name == "open_clip_model.safetensors"
    assert calls and all(local for _, local in calls)


def test_unreachable_hub_fails_fast_without_download_attempts(empty_offline_hub, online_mode, monkeypatch):
    calls = _record_downloads(monkeypatch)
    probes = []
    monkeypatch.setattr(hub, "_hub_reachable", lambda: probes.append(1) or False)
    with pytest.raises(ModelUnavailableError) as info:
        hub.fetch_model_files("chs20/fare4-clip", family=hub.OPEN_CLIP)
    assert probes == [1]
    assert all(local for _, local in calls)  # only cache lookups, no download attempted
    assert "percept models download hf-hub:chs20/fare4-clip" in str(info.value)


def test_refresh_skips_cache_lookup_when_online(offline_hub, online_mode, monkeypatch):
    calls = _record_downloads(monkeypatch)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)
    files = hub.fetch_model_files("chs20/fare2-clip", family=hub.OPEN_CLIP, refresh=True)
    assert files.repo_id == "chs20/fare2-clip"
    assert calls and not any(local for _, local in calls)  # asked the Hub (spied: served from cache)


def _both_weight_files(directory, family):
    """A model directory holding DIFFERENT weights as .safetensors and as .bin; returns (st, bin) models."""
    if family == hub.OPEN_CLIP:
        st = tiny_models.save_open_clip_dir(directory, tiny_models.VIT_CFG, seed=21)
        pt = tiny_models.save_open_clip_dir(directory, tiny_models.VIT_CFG, seed=22,
                                            weights_name="open_clip_pytorch_model.bin")
        return st.visual, pt.visual, tiny_models.CLIP_MEAN, tiny_models.CLIP_STD
    st = tiny_models.save_timm_dir(directory, seed=21)
    pt = tiny_models.save_timm_dir(directory, seed=22, weights_name="pytorch_model.bin")
    cfg = tiny_models.TIMM_VIT_CFG["pretrained_cfg"]
    return st, pt, cfg["mean"], cfg["std"]


@pytest.mark.parametrize("where", ["local-dir", "hub-cache"])
@pytest.mark.parametrize("family", [hub.OPEN_CLIP, hub.TIMM])
def test_safetensors_weights_win_over_bin(offline_hub, tmp_path, family, where):
    directory = tmp_path / f"both-{family}"
    st_model, bin_model, mean, std = _both_weight_files(directory, family)
    name = str(directory)
    if where == "hub-cache":
        tiny_models.add_to_hub_cache(offline_hub, f"someone/both-{family}", directory)
        name = f"hf-hub:someone/both-{family}"
    encoder, source = load_encoder(parse_model_name(name))
    x = torch.rand(2, 3, 224, 224)
    inputs = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = encoder(x)
        torch.testing.assert_close(ours, st_model(inputs), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, bin_model(inputs), atol=1e-3)
    assert source.weights.endswith(".safetensors")
