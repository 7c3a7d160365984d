"""The public Python API: every exported name resolves, the functions raise instead of exiting,
and a run can be given its store."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import runner
from runner.store import Store

SAMPLE = ["card_jpeg.jpg", "card_png.png", "card_copy.jpg", "broken_empty.jpg"]


def demo_job(tmp_path, sample_data):
    images = tmp_path / "images"
    images.mkdir()
    for name in SAMPLE:
        shutil.copy(sample_data / name, images / name)
    job_file = tmp_path / "job.toml"
    job_file.write_text('name = "api"\n[source]\npaths = ["images/"]\n'
                        '[api]\nendpoint = "sandbox"\n[state]\ndb = "state.db"\n')
    return runner.load_job(job_file)


def test_every_exported_name_resolves():
    for name in runner.__all__:
        assert getattr(runner, name) is not None, name
    with pytest.raises(AttributeError):
        runner.no_such_name  # noqa: B018


def test_importing_the_package_loads_no_pipeline():
    code = ("import sys, runner; print(','.join(m for m in ('runner.executors', 'runner.store',"
            " 'click', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_library_functions_raise_instead_of_exiting(tmp_path, sample_data):
    job = demo_job(tmp_path, sample_data)
    with pytest.raises(runner.StateError) as err:
        runner.status_report(job)
    assert err.value.exit_code == runner.ExitCode.FAILURES
    with pytest.raises(runner.StateError):
        list(runner.export_rows(job))
    with pytest.raises(runner.StateError):
        runner.retry_failed(job)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[source]\npaths = ["images/"]\n[api]\nbatch_size = 11\n')
    with pytest.raises(runner.JobError, match="api.batch_size"):
        runner.load_job(bad)


def test_plan_then_run_with_a_given_store(tmp_path, sample_data):
    job = demo_job(tmp_path, sample_data)
    plan = runner.plan_job(job)
    assert (plan.listed, plan.sent, plan.reused, plan.rejected) == (4, 2, 1, 1)
    with Store(job.db_path) as store:
        summary = runner.run_job(job, runner.RunOptions(), store=store)
        assert store.stats.transactions > 0  # the run wrote through the store it was given
    assert (summary.exit_code, summary.done, summary.reused, summary.rejected) == (
        runner.ExitCode.OK, 3, 1, 1)
    report = runner.status_report(job)
    assert report["states"] == {"pending": 0, "done": 3, "failed": 0, "rejected": 1}
    rows = {r["key"].rsplit("/", 1)[1]: r for r in runner.export_rows(job, state="done")}
    assert set(rows) == {"card_jpeg.jpg", "card_png.png", "card_copy.jpg"}
    assert runner.run_job(job).sent == 0  # resumable: nothing left to send
