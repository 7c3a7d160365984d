"""What the installed package promises: one version, no stray top-level names."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from driver import invoke

import runner

REPO = Path(__file__).resolve().parent.parent


def test_the_version_has_one_source():
    """pyproject reads runner.__version__; `ximrun --version` and the installed metadata agree."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "runner.__version__"}
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.output == f"ximrun, version {importlib.metadata.version('ximrun')}\n"
    assert importlib.metadata.version("ximrun") == runner.__version__


def test_the_distribution_installs_runner_and_nothing_else_at_the_top():
    """Not bench, tests or scripts: the wheel's contents (scripts/check_dist.sh checks the wheel)."""
    top = importlib.metadata.distribution("ximrun").read_text("top_level.txt")
    assert top is not None and top.split() == ["runner"]

