"""For operators: the metrics file (parsed by Prometheus' own parser), the log file and its JSON
lines, `--stats`, and every option from the environment."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from driver import TOKEN, child_env, invoke, make_images, run_json, start, write_job
from prometheus_client.parser import text_string_to_metric_families

from runner import logs
from runner.errors import JobError
from runner.job import SandboxSettings, load_job
from runner.lock import run_lock
from runner.metrics import render
from runner.sandbox import Sandbox


@pytest.fixture(autouse=True)
def _no_log_file_left_open():
    yield
    logs.close()
    root = logging.getLogger("ximrun")
    for h in root.handlers:
        h.filters.clear()


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a textfile, parsed the way Prometheus reads it."""
    out = {}
    families = list(text_string_to_metric_families(path.read_text(encoding="utf-8")))
    for fam in families:
        assert fam.documentation, fam.name  # every metric has its HELP
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(values: dict, name: str, **labels: str) -> float:
    return values[(name, tuple(sorted({"job": "t", **labels}.items())))]


def test_a_run_writes_every_metric_in_the_textfile_format(tmp_path, sandbox):
    make_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"")
    job = write_job(tmp_path, sandbox, tmp_path / "imgs", credits={"per_image": 10})
    prom = tmp_path / "textfile" / "ximrun.prom"
    prom.parent.mkdir()
    summary = run_json(job, "--metrics-file", str(prom))
    v = samples(prom)
    assert one(v, "ximrun_last_run_exit_code") == 0
    start_s, end_s = one(v, "ximrun_last_run_start_timestamp_seconds"), one(
        v, "ximrun_last_run_end_timestamp_seconds")
    assert 0 <= end_s - start_s == pytest.approx(one(v, "ximrun_last_run_duration_seconds"))
    assert one(v, "ximrun_images", state="done") == 5
    assert one(v, "ximrun_images", state="rejected") == 1
    assert one(v, "ximrun_images", state="pending") == 0
    assert one(v, "ximrun_last_run_images_sent") == summary["sent"] == 5
    assert one(v, "ximrun_last_run_images_reused") == 0
    assert one(v, "ximrun_last_run_credits") == 50
    # A counter: the parser names the family without _total, the sample keeps it.
    assert one(v, "ximrun_credits_recorded_total") == 50
    assert one(v, "ximrun_images_possibly_billed_without_answer") == 0
    assert ("ximrun_account_credits_counter", (("job", "t"),)) in v
    assert one(v, "ximrun_account_credits_remaining") == (
        sandbox.settings.credits - one(v, "ximrun_account_credits_counter"))
    # Only the file itself in the folder: the temporary file was renamed over it.
    assert [p.name for p in prom.parent.iterdir()] == ["ximrun.prom"]

    # A second run: the totals carry on, this run's figures are its own.
    run_json(job, "--metrics-file", str(prom))
    v = samples(prom)
    assert one(v, "ximrun_last_run_credits") == 0
    assert one(v, "ximrun_credits_recorded_total") == 50


def test_the_metrics_are_written_whatever_the_ending(tmp_path, sandbox):
    make_images(tmp_path / "imgs", 3)
    prom = tmp_path / "m.prom"
    # From the job file, relative to it.
    job = write_job(tmp_path, sandbox, tmp_path / "imgs",
                    extra='[monitoring]\nmetrics_file = "m.prom"\n')
    assert load_job(job, require_token=False).monitoring.metrics_file == str(prom)
    # The budget stops it: exit 3.
    run_json(job, "--budget", "10", exit_code=3)
    assert one(samples(prom), "ximrun_last_run_exit_code") == 3
    assert one(samples(prom), "ximrun_images", state="pending") == 2
    # The token refused: exit 5.
    res = invoke("run", str(job), env={"XIMILAR_TOKEN": "wrong"})
    assert res.exit_code == 5, res.output
    assert one(samples(prom), "ximrun_last_run_exit_code") == 5
    # Another run holds the lock: exit 75, no figures of a run, the database's still there.
    with run_lock(tmp_path / "state" / "t.db"):
        res = invoke("run", str(job))
    assert res.exit_code == 75
    v = samples(prom)
    assert one(v, "ximrun_last_run_exit_code") == 75
    assert ("ximrun_last_run_credits", (("job", "t"),)) not in v
    assert one(v, "ximrun_images", state="done") == 1
    # The option overrides the job's key.
    other = tmp_path / "other.prom"
    run_json(job, "--metrics-file", str(other))
    assert one(samples(other), "ximrun_last_run_exit_code") == 0
    assert one(samples(prom), "ximrun_last_run_exit_code") == 75


def test_an_unwritable_metrics_file_is_logged_not_fatal(tmp_path, sandbox):
    make_images(tmp_path / "imgs", 2)
    job = write_job(tmp_path, sandbox, tmp_path / "imgs")
    res = invoke("run", str(job), "--metrics-file", str(tmp_path / "no" / "such" / "m.prom"))
    assert res.exit_code == 0
    assert "cannot write the metrics file" in res.output


def test_label_values_and_help_are_escaped():
    text = render([("ximrun_last_run_exit_code", {"job": 'a"b\\c\nd'}, 0)])
    fam = next(text_string_to_metric_families(text))
    assert fam.samples[0].labels["job"] == 'a"b\\c\nd'


@pytest.mark.parametrize("value", ["", "   "])
def test_the_monitoring_table_is_validated(tmp_path, value):
    job = write_job(tmp_path, "sandbox", tmp_path,
                    extra=f'[monitoring]\nmetrics_file = "{value}"\n')
    with pytest.raises(JobError, match="monitoring.metrics_file"):
        load_job(job, require_token=False)
    job = write_job(tmp_path, "sandbox", tmp_path, extra='[monitoring]\nfile = "x"\n')
    with pytest.raises(JobError, match="monitoring.file: unknown key"):
        load_job(job, require_token=False)


# --- logs --------------------------------------------------------------------------------------


def test_json_log_lines_in_a_file_with_the_summary_even_when_quiet(tmp_path, sandbox):
    make_images(tmp_path / "imgs", 4)
    job = write_job(tmp_path, sandbox, tmp_path / "imgs")
    log_file = tmp_path / "ximrun.log"
    res = invoke("run", str(job), "-q", "--log-file", str(log_file), "--log-format", "json")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
        assert line["time"].endswith("Z") and line["logger"].startswith("ximrun")
    last = lines[-1]
    assert last["event"] == "run_ended" and last["exit_code"] == 0
    assert last["summary"]["done"] == 4 and last["summary"]["job"] == "t"
    # stderr keeps its text lines and leaves the summary line to stdout.
    assert "run ended" not in res.stderr
    # A second run appends.
    invoke("run", str(job), "--log-file", str(log_file))
    text_lines = log_file.read_text(encoding="utf-8").splitlines()[len(lines):]
    assert text_lines and not text_lines[-1].startswith("{")
    assert "t: run ended with exit code 0" in text_lines[-1]


@pytest.mark.slow
def test_progress_lines_every_stats_seconds_as_json_from_the_environment(tmp_path):
    make_images(tmp_path / "imgs", 6)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=1500)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api={"batch_size": 10, "concurrency": 1, "timeout_s": 20})
        # Every option from the environment: XIMRUN_<COMMAND>_<OPTION>.
        env = child_env(XIMRUN_RUN_STATS="0.1", XIMRUN_RUN_LOG_FORMAT="json",
                        XIMRUN_RUN_METRICS_FILE=str(tmp_path / "m.prom"))
        child = start(tmp_path, "run", str(job), env=env)
        assert child.wait() == 0, child.output()
    progress = [json.loads(line) for line in child.stderr.splitlines()
                if line.startswith("{") and '"progress"' in line]
    assert len(progress) >= 3, child.stderr
    assert {"settled", "todo", "done", "credits", "images_per_s"} <= progress[-1].keys()
    assert (tmp_path / "m.prom").exists()


def test_every_option_reads_its_environment_variable(tmp_path, sandbox):
    make_images(tmp_path / "imgs", 3)
    job = write_job(tmp_path, sandbox, tmp_path / "imgs")
    res = invoke("run", str(job), env={"XIMRUN_RUN_LIMIT": "1", "XIMRUN_RUN_JSON": "1"})
    assert res.exit_code == 3, res.output
    assert json.loads(res.stdout)["done"] == 1
    res = invoke("export", str(job), env={"XIMRUN_EXPORT_FORMAT": "csv"})
    assert res.stdout.startswith("key,uri,state,")
    # The command line wins over the variable.
    res = invoke("export", str(job), "--format", "jsonl", env={"XIMRUN_EXPORT_FORMAT": "csv"})
    assert res.stdout.startswith("{")
    assert "XIMRUN_RUN_METRICS_FILE" in invoke("run", "--help").output


def test_the_console_script_completes_for_bash(tmp_path):
    child = start(tmp_path, env=child_env(_XIMRUN_COMPLETE="bash_source"))
    assert child.wait() == 0, child.output()
    assert "_ximrun_completion" in child.stdout
    env = child_env(_XIMRUN_COMPLETE="bash_complete", COMP_WORDS="ximrun rep", COMP_CWORD="1")
    child = start(tmp_path, env=env)
    assert child.wait() == 0
    assert "report" in child.stdout
    assert os.environ.get("_XIMRUN_COMPLETE") is None
