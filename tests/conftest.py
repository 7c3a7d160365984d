"""Shared fixtures: the API emulator over real HTTP and a real S3 server (moto) on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driver import TOKEN  # noqa: E402
from s3server import s3_bucket, s3_endpoint  # noqa: E402,F401

from runner.job import SandboxSettings  # noqa: E402
from runner.sandbox import Sandbox  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture
def sandbox():
    """A fault-free emulator; tests that want faults build their own Sandbox(SandboxSettings(...))."""
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        yield sb


@pytest.fixture
def sample_data() -> Path:
    return SAMPLE_DATA
