"""The installed `percept` script, in a fresh process, with only environment variables set.

This is the "no network, model copied into the cache" path a user takes: HF_HUB_CACHE
points at a cache holding the default model's repo, HF_HUB_OFFLINE=1, and the README's
example command runs on the shipped example images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _percept() -> list[str]:
    script = Path(sys.executable).parent / "percept"
    return [str(script)] if script.exists() else [sys.executable, "-m", "percept_cli"]


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PERCEPT_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return env


def test_readme_example_offline(zoo_cache):
    cmd = _percept() + ["distance", str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "cat-distorted.jpg"),
                        str(EXAMPLES / "coffee.jpg"), "--json"]
    proc = subprocess.run(cmd, env=_env(zoo_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["mode"] == "rank" and doc["model"]["zoo"] == "rclip-f-convnext-b"
    assert {Path(r["b"]).name for r in doc["results"]} == {"cat-distorted.jpg", "coffee.jpg"}
    assert "Traceback" not in proc.stderr


def test_uncached_default_model_message(tmp_path):
    cmd = _percept() + ["distance", str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "coffee.jpg")]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "percept models download" in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["models", "list"]])
def test_module_entry_point(args):
    proc = subprocess.run([sys.executable, "-m", "percept_cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "percept" in proc.stdout


def test_help_does_not_import_torch():
    code = "import sys; from percept_cli.cli.app import app; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_closed_pipe_exits_quietly(extra):
    """`percept models list | head -1`: the reader leaves early; percept exits 0 with nothing on stderr."""
    proc = subprocess.Popen(_percept() + ["models", "list", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before percept writes (a `head` that has had its line)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert err == b""
