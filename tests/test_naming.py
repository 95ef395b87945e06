"""Parsing --model strings: a table of cases, as timm tests its parser."""

from __future__ import annotations

import pytest

from percept_cli.errors import BadInputError, UnknownModelError
from percept_cli.models.naming import parse_model_name


@pytest.mark.parametrize("name, kind, identifier, revision", [
    ("rclip-f-convnext-b", "hf-hub", "chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg", None),
    ("RCLIP-F", "hf-hub", "chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg", None),
    ("rclip-t-vit-b16", "hf-hub", "chs20/TeCoA4-ViT-B-16-laion2B-s34B-b88K", None),
    ("dino-vit-b16", "hf-hub", "timm/vit_base_patch16_224.dino", None),
    ("hf-hub:chs20/fare2-clip", "hf-hub", "chs20/fare2-clip", None),
    ("hf-hub:org/model@v1.0", "hf-hub", "org/model", "v1.0"),
])
def test_hub_names(name, kind, identifier, revision):
    ref = parse_model_name(name)
    assert (ref.kind, ref.identifier, ref.revision) == (kind, identifier, revision)


def test_local_dir_forms(tmp_path):
    assert parse_model_name(str(tmp_path)).kind == "local-dir"
    assert parse_model_name(f"local-dir:{tmp_path}").identifier == str(tmp_path.resolve())
    with pytest.raises(BadInputError, match="does not exist"):
        parse_model_name(f"local-dir:{tmp_path / 'nope'}")


def test_file_as_model_explains_checkpoint(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(BadInputError, match="--checkpoint"):
        parse_model_name(str(tmp_path / "w.pt"))


def test_checkpoint_forms(tmp_path):
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"x")
    assert parse_model_name("convnext_base_w", ckpt).identifier == "convnext_base_w"
    ref = parse_model_name("rclip-f-convnext-b", ckpt)
    assert (ref.kind, ref.identifier) == ("checkpoint", "convnext_base_w") and ref.spec.name == "rclip-f-convnext-b"
    assert parse_model_name("rclip-t4-vit-l14", ckpt).identifier == "ViT-L-14-quickgelu"
    with pytest.raises(UnknownModelError, match="architecture"):
        parse_model_name("not-an-arch", ckpt)
    with pytest.raises(BadInputError, match="does not exist"):
        parse_model_name("ViT-B-32", tmp_path / "missing.pt")


@pytest.mark.parametrize("name", ["", "rclip-f-convnxt-b", "nope"])
def test_unknown_names_suggest(name):
    with pytest.raises(UnknownModelError) as info:
        parse_model_name(name)
    assert "percept models list" in str(info.value)


def test_close_names_are_suggested():
    with pytest.raises(UnknownModelError, match="Did you mean rclip-f-convnext-b"):
        parse_model_name("rclip-f-convnxt-b")


@pytest.mark.parametrize("name", ["/no/such/model-dir", "./model", "~/percept-no-such-model", "models/mine"])
def test_path_like_names_say_no_such_directory(name):
    with pytest.raises(BadInputError) as info:
        parse_model_name(name)
    assert not isinstance(info.value, UnknownModelError)
    assert "no such directory" in str(info.value)


def test_repo_id_without_prefix_suggests_hf_hub():
    with pytest.raises(BadInputError, match="hf-hub:chs20/no-such-repo"):
        parse_model_name("chs20/no-such-repo")
