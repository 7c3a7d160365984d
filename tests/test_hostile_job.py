"""Hostile job files: NaN, infinities and huge numbers, and paths that name nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from driver import invoke

from runner.errors import JobError
from runner.job import parse_job

JOB = Path("/jobs/x.toml")
SOURCE = '[source]\npaths = ["imgs/"]\n'


def parse(text: str):
    return parse_job('name = "j"\n' + text, JOB, {"XIMILAR_TOKEN": "t0k"})


@pytest.mark.parametrize("key", ["timeout_s", "connect_timeout_s"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e300"])
def test_api_numbers_must_be_finite_and_in_range(key: str, value: str):
    with pytest.raises(JobError, match=f"^api.{key}: "):
        parse(SOURCE + f'[api]\nendpoint = "https://x.invalid/a"\n{key} = {value}\n')


@pytest.mark.parametrize("key", ["latency_ms", "jitter_ms", "p429", "retry_after_s", "p500",
                                 "p502", "pdrop", "prefuse", "precord_retry", "rate_limit_rps"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e300"])
def test_every_sandbox_number_must_be_finite_and_in_range(key: str, value: str):
    with pytest.raises(JobError, match=f"^sandbox.{key}: "):
        parse(SOURCE + f"[sandbox]\n{key} = {value}\n")


@pytest.mark.parametrize("section,key,value", [
    ("credits", "budget", 10**18), ("credits", "per_image", 10**12),
    ("images", "max_side", 10**9), ("images", "max_pixels", 10**15),
    ("images", "max_bytes", 0), ("images", "max_bytes", 10**15),
    ("sandbox", "credits", 10**18), ("sandbox", "max_image_bytes", 10**15),
])
def test_integers_have_a_finite_range_too(section: str, key: str, value: int):
    with pytest.raises(JobError, match=f"^{section}.{key}: {value} is out of range"):
        parse(SOURCE + f"[{section}]\n{key} = {value}\n")


def test_nan_in_the_request_fields_is_refused():
    with pytest.raises(JobError, match=r"^api.fields.opts.x: nan is not a finite number"):
        parse(SOURCE + '[api]\nfields = { lang = "en", opts = { x = nan } }\n')


@pytest.mark.parametrize("paths", ['[""]', '["  "]', '["imgs/", ""]', '""'])
def test_an_empty_path_is_refused_not_the_job_files_folder(paths: str):
    with pytest.raises(JobError, match=r"^source.paths: an empty string is not a path"):
        parse(f"[source]\npaths = {paths}\n")
    with pytest.raises(JobError, match=r"^source.manifest: an empty string"):
        parse('[source]\npaths = ["imgs/"]\nmanifest = "  "\n')


def test_the_command_line_exits_2_naming_the_key(tmp_path: Path):
    job = tmp_path / "j.toml"
    job.write_text('name = "j"\n[source]\npaths = ["imgs/"]\n[sandbox]\nlatency_ms = nan\n',
                   encoding="utf-8")
    for command in ("run", "plan"):
        res = invoke(command, str(job))
        assert res.exit_code == 2, res.output
        assert "sandbox.latency_ms: nan is not a finite number" in res.output
        assert "Traceback" not in res.output
    res = invoke("sandbox", "--latency-ms", "nan")
    assert res.exit_code == 2 and "latency_ms" in res.output
