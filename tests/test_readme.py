"""The README's commands are the ones CI runs, and the files they name exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"&& {command}\n" in readme


def test_readme_example_images_exist():
    readme = (ROOT / "README.md").read_text()
    names = re.findall(r"docs/examples/([\w.-]+\.jpg)", readme)
    assert len(names) >= 3
    for name in names:
        assert (ROOT / "docs" / "examples" / name).is_file()
