"""Driving the real CLI in-process from the end-to-end tests: run a command, read its JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from runner.cli import main

TOKEN = "test-token"


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env={"XIMILAR_TOKEN": TOKEN, **(env or {})},
                              catch_exceptions=False)


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def plan_json(job: Path) -> dict:
    res = invoke("plan", str(job), "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def export(job: Path) -> dict[str, dict]:
    res = invoke("export", str(job))
    assert res.exit_code == 0, res.output
    return {row["key"]: row for row in map(json.loads, res.output.splitlines())}


def status(job: Path) -> dict:
    return json.loads(invoke("status", str(job), "--json").stdout)
