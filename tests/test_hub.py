"""Hub access is cache-first and fails fast when the Hub cannot be reached."""

from __future__ import annotations

import pytest

from percept_cli.models import hub
from percept_cli.errors import ModelUnavailableError


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
