"""End to end: the real CLI against the emulator over HTTP, with real files and a real database."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from driver import (
    TOKEN,
    export_rows,
    invoke,
    jpeg,
    plan_json,
    run_json,
    sends,
    status_json,
    write_job,
)

from runner.job import SandboxSettings
from runner.sandbox import Sandbox


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (d / f"card{i}.jpg").write_bytes(jpeg(color))
    (d / "broken.jpg").write_bytes(b"not an image at all")
    return d


def test_sample_data_every_format_row_ends_in_the_right_state(tmp_path, sandbox, sample_data):
    job = write_job(tmp_path, sandbox, sample_data, exclude=["*.md"])
    summary = run_json(job)
    rows = export_rows(job)
    by_name = {Path(k).name: r for k, r in rows.items()}
    for name, row in by_name.items():
        if name.startswith("reject_"):
            assert row["state"] == "rejected", name
            assert row["reason"].startswith("unsupported_format:"), row
        elif name.startswith("broken_"):
            assert row["state"] == "rejected", name
            assert not row["reason"].startswith("unsupported_format"), row
        else:
            assert row["state"] == "done", (name, row)
            assert row["result"]["_status"]["code"] == 200
    # nothing rejected was ever sent, nothing rejected was billed
    sent = set(sends(sandbox))
    assert not {k for k, r in rows.items() if r["state"] == "rejected"} & sent
    assert all(r["credits"] == 0 for r in rows.values() if r["state"] == "rejected")
    assert summary["rejected"] == sum(r["state"] == "rejected" for r in rows.values())


def test_rerun_sends_nothing_that_is_done(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    first = invoke("run", str(job))
    assert first.exit_code == 0, first.output
    n = len(sandbox.ledger())
    assert n == 3
    s = run_json(job)
    assert len(sandbox.ledger()) == n
    assert s["unchanged"] == 4 and s["sent"] == 0 and s["credits"] == 0


def test_changed_file_is_sent_again_and_plan_says_so(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    assert invoke("run", str(job)).exit_code == 0
    (folder / "card0.jpg").write_bytes(jpeg((10, 10, 10), size=(80, 60)))
    (folder / "new.jpg").write_bytes(jpeg((90, 90, 10)))
    plan = plan_json(job)
    assert (plan["new"], plan["changed"], plan["unchanged"]) == (1, 1, 3)
    assert plan["credits"] == 20
    before = len(sandbox.ledger())
    assert invoke("run", str(job)).exit_code == 0
    assert len(sandbox.ledger()) == before + 2


def test_changing_fields_sends_again(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder, api={"fields": {"lang": "en"}})
    assert invoke("run", str(job)).exit_code == 0
    job2 = write_job(tmp_path, sandbox, folder, api={"fields": {"lang": "de"}})
    assert job2 == job
    plan = plan_json(job)
    assert plan["changed_request"] == 3
    assert invoke("run", str(job)).exit_code == 0
    assert len(sandbox.ledger()) == 6


def test_duplicates_are_sent_once_and_reused(tmp_path, sandbox, folder):
    for i in range(3):
        shutil.copy(folder / "card0.jpg", folder / f"sku-{i}.jpg")
    job = write_job(tmp_path, sandbox, folder)
    plan = plan_json(job)
    assert plan["sent"] == 3 and plan["reused"] == 3 and plan["credits"] == 30
    run_json(job)
    assert len(sandbox.ledger()) == 3
    rows = export_rows(job)
    same = [r for k, r in rows.items() if "sku-" in k or k.endswith("card0.jpg")]
    assert all(r["state"] == "done" for r in same)
    paid = [r for r in same if r["credits"] == 10 and r["reused_from"] is None]
    free = [r for r in same if r["credits"] == 0 and r["reused_from"] == paid[0]["key"]]
    assert len(paid) == 1 and len(free) == 3
    st = status_json(job)
    assert st["reused"] == 3 and st["credits"]["saved_by_reuse"] == 30


def test_reuse_false_sends_every_copy(tmp_path, sandbox, folder):
    shutil.copy(folder / "card0.jpg", folder / "sku.jpg")
    job = write_job(tmp_path, sandbox, folder, credits={"reuse": False})
    assert invoke("run", str(job)).exit_code == 0
    assert len(sandbox.ledger()) == 4


@pytest.mark.parametrize("body,key", [
    ("[api]\nbatch_size = 11", "api.batch_size"),
    ("[images]\nsend = 'ftp'", "images.send"),
    ("[credits]\nbudgett = 3", "credits.budgett"),
])
def test_bad_job_file_exits_2_naming_the_key_and_sends_nothing(tmp_path, sandbox, folder, body,
                                                               key):
    job = tmp_path / "bad.toml"
    job.write_text(f'name = "b"\n[source]\npaths = ["{folder}"]\n{body}\n')
    res = invoke("run", str(job))
    assert res.exit_code == 2
    assert key in res.output
    assert sandbox.ledger() == []
    assert not (tmp_path / "state").exists()


def test_missing_token_variable_exits_2(tmp_path, folder):
    job = write_job(tmp_path, "http://127.0.0.1:9/x", folder, name="j",
                    api={"token_env": "NO_SUCH_VAR_XR"})
    res = invoke("run", str(job))
    assert res.exit_code == 2 and "NO_SUCH_VAR_XR" in res.output


def test_refused_token_exits_5_and_never_prints_it(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    secret = "wrong-secret-value-123"
    res = invoke("run", str(job), env={"XIMILAR_TOKEN": secret})
    assert res.exit_code == 5
    assert "token" in res.output.lower()
    assert secret not in res.output
    db = (tmp_path / "state" / "t.db").read_bytes()
    assert secret.encode() not in db


def test_refused_records_fail_and_exit_1(tmp_path, folder):
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=1.0)) as sb:
        job = write_job(tmp_path, sb, folder)
        res = invoke("run", str(job))
        assert res.exit_code == 1, res.output
        rows = export_rows(job)
        failed = [r for r in rows.values() if r["state"] == "failed"]
        assert len(failed) == 3 and all("400" in r["reason"] for r in failed)
        # a rerun does not resend failed images; retry puts them back
        assert invoke("run", str(job)).exit_code == 1
        assert len(sb.ledger()) == 3
        assert "3 failed" in invoke("retry", str(job)).output
    with Sandbox(SandboxSettings(token=TOKEN)) as sb2:
        job = write_job(tmp_path, sb2, folder)
        assert invoke("run", str(job)).exit_code == 0
        assert len(sb2.ledger()) == 3


def test_budget_stops_with_exit_3_and_the_next_run_continues(tmp_path, sandbox, folder):
    for i in range(7):
        (folder / f"more{i}.jpg").write_bytes(jpeg((i * 30, 100, 50)))
    job = write_job(tmp_path, sandbox, folder, api={"batch_size": 4}, credits={"budget": 50})
    s = run_json(job, exit_code=3)
    assert s["credits"] <= 50 and s["pending"] > 0
    st = status_json(job)
    assert st["credits"]["recorded"] <= 50
    assert sum(e.billed for e in sandbox.ledger()) * 10 <= 50
    res = invoke("run", str(job), "--budget", "1000")
    assert res.exit_code == 0, res.output
    st = status_json(job)
    assert st["states"]["done"] == 10 and st["states"]["pending"] == 0


def test_limit_stops_with_exit_3(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    assert run_json(job, "--limit", "2", exit_code=3)["pending"] == 2
    assert invoke("run", str(job)).exit_code == 0


def test_second_run_of_the_same_database_exits_75(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    lock = tmp_path / "state" / "t.db.lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        res = invoke("run", str(job))
        assert res.exit_code == 75
        assert "4242" in res.output
    finally:
        os.close(fd)
    assert sandbox.ledger() == []


def test_status_and_export_formats(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    invoke("run", str(job))
    st = status_json(job)
    assert st["states"] == {"pending": 0, "done": 3, "failed": 0, "rejected": 1}
    assert st["credits"]["recorded"] == 30
    assert st["runs"][0]["status"] == "finished"
    assert st["possibly_billed_without_answer"] == []
    text = invoke("status", str(job)).output
    assert "done" in text and "recent runs" in text
    out = tmp_path / "out.csv"
    assert invoke("export", str(job), "--format", "csv", "-o", str(out)).exit_code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4
    assert {r["state"] for r in rows} == {"done", "rejected"}
    done = [r for r in rows if r["state"] == "done"]
    assert json.loads(done[0]["result"])["_status"]["code"] == 200
    rejected = list(export_rows(job, "--state", "rejected").values())
    assert len(rejected) == 1 and rejected[0]["reason"] == "not_an_image"


def test_check_prints_a_verdict_per_file(sample_data):
    files = sorted(str(p) for p in sample_data.iterdir() if p.suffix != ".md")
    res = invoke("check", *files, "--json")
    verdicts = [json.loads(line) for line in res.output.splitlines()]
    assert len(verdicts) == len(files)
    assert res.exit_code == 1  # the sample data has rejected files
    for v in verdicts:
        name = Path(v["file"]).name
        if name.startswith(("reject_", "broken_")):
            assert v["action"] == "reject", v
        else:
            assert v["action"] in ("accept", "convert"), v


def test_demo_job_runs_against_the_embedded_sandbox_even_with_a_proxy_set(tmp_path, sample_data):
    # The emulator lives in the run's own process: a proxy the environment names (here one
    # that does not exist) is not for it.
    job = write_job(tmp_path, "sandbox", sample_data, name="demo", exclude=["*.md"],
                    db="demo.db")
    dead = "http://127.0.0.1:9"
    res = invoke("run", str(job), env={"XIMILAR_TOKEN": "", "http_proxy": dead, "HTTP_PROXY": dead,
                                       "no_proxy": None, "NO_PROXY": None})
    assert res.exit_code == 0, res.output
    assert "finished" in res.output


def test_a_proxy_the_client_cannot_speak_is_refused_before_anything_is_sent(tmp_path, sandbox,
                                                                           folder):
    job = write_job(tmp_path, sandbox, folder)
    socks = "socks5://127.0.0.1:1080"
    res = invoke("run", str(job), env={"all_proxy": socks, "ALL_PROXY": socks, "no_proxy": None,
                                       "NO_PROXY": None, "http_proxy": None, "HTTP_PROXY": None})
    assert res.exit_code == 2, res.output
    assert "socks5" in res.output and "Traceback" not in res.output
    assert sandbox.ledger() == []


def test_touched_file_with_the_same_bytes_is_not_paid_again(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    assert invoke("run", str(job)).exit_code == 0
    p = folder / "card1.jpg"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    plan = plan_json(job)
    assert plan["changed"] == 1 and plan["credits"] == 0 and plan["reused"] == 1
    run_json(job)
    assert len(sandbox.ledger()) == 3
    row = export_rows(job)[str(p)]
    assert row["state"] == "done" and row["result"]["_status"]["code"] == 200


def test_a_missing_root_is_refused_before_anything_is_sent(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, [folder, f"{tmp_path}/nope/"], name="j")
    res = invoke("run", str(job))
    assert res.exit_code == 2 and "nope" in res.output
    assert sandbox.ledger() == []


def test_quiet_prints_nothing_at_all_on_exit_0_and_the_summary_otherwise(tmp_path, sandbox,
                                                                         folder):
    (folder / "broken.jpg").unlink()
    job = write_job(tmp_path, sandbox, folder)
    for args in (["-q"], ["-q", "--json"]):
        res = invoke("run", *args, str(job))
        assert res.exit_code == 0 and res.stdout == "" and res.stderr == "", res.output
    # a run that does not exit 0 says why, even with -q
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=1.0)) as sb:
        job = write_job(tmp_path, sb, folder, name="q2")
        res = invoke("run", "-q", str(job))
    assert res.exit_code == 1
    assert "finished_with_failures" in res.stdout and "failed" in res.stdout


LONG_TOKEN = "eyJhbGciOiJIUzI1NiJ9." + "x" * 60  # 81 characters: a JWT for "auto"


def test_auth_scheme_picks_the_authorization_header():
    from runner.wire import authorization

    assert authorization("abc") == "Token abc"
    assert authorization(LONG_TOKEN) == f"JWT {LONG_TOKEN}"
    assert authorization(LONG_TOKEN[:69]) == f"Token {LONG_TOKEN[:69]}"
    assert authorization("abc", "jwt") == "JWT abc"
    assert authorization(LONG_TOKEN, "token") == f"Token {LONG_TOKEN}"


@pytest.mark.parametrize("scheme, token", [("jwt", TOKEN), ("auto", LONG_TOKEN),
                                           ("token", LONG_TOKEN)])
def test_auth_scheme_runs_end_to_end_against_the_sandbox(tmp_path, folder, scheme, token):
    with Sandbox(SandboxSettings(token=token)) as sb:
        job = write_job(tmp_path, sb, folder, api={"auth_scheme": scheme})
        res = invoke("run", str(job), env={"XIMILAR_TOKEN": token})
        assert res.exit_code == 0, res.output
        assert len(sb.ledger()) == 3


def test_an_unknown_auth_scheme_is_refused(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder, api={"auth_scheme": "bearer"})
    res = invoke("run", str(job))
    assert res.exit_code == 2
    assert 'api.auth_scheme: \'bearer\' must be "token", "jwt" or "auto"' in res.output
