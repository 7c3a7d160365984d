"""Spending limits through the CLI: the budget, per run, per day and month (in a time zone, with a
fake clock), the account's floor, the time window, and the promise that every request that may
have been billed without an answer counts against them (lost answers, a killed run)."""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from driver import (
    CHILD_API,
    TOKEN,
    db_count,
    export_rows,
    invoke,
    make_images,
    plan_json,
    run_json,
    settle,
    start,
    status_json,
    wait_for,
    write_job,
)

from runner import limits
from runner.job import SandboxSettings
from runner.sandbox import Sandbox

PER_IMAGE = 10


def billed(sb: Sandbox) -> int:
    """Credits the emulator took (10 per billed record)."""
    return sum(e.billed for e in sb.ledger()) * PER_IMAGE


def states(job) -> dict[str, int]:
    return status_json(job)["states"]


@pytest.fixture
def folder(tmp_path):
    make_images(tmp_path / "imgs", 10)
    return tmp_path / "imgs"


def fake_clock(monkeypatch, start: datetime, step: timedelta = timedelta(minutes=1)) -> None:
    """limits.now(): `start`, plus `step` for every batch the run has recorded. Batches are
    counted as they settle, one at a time: two answered together (one commit) are still a
    minute apart, as the run records them in turn."""
    recorded = [0]
    lock = threading.Lock()
    settle = limits.Limits.settle

    def settle_in_turn(self: limits.Limits, reserved: int, credits: int) -> None:
        with lock:
            recorded[0] += 1
            settle(self, reserved, credits)

    def now() -> datetime:
        return (start + recorded[0] * step).astimezone(UTC)

    monkeypatch.setattr(limits.Limits, "settle", settle_in_turn)
    monkeypatch.setattr(limits, "now", now)


# --- the job file and the options ---------------------------------------------------------------

@pytest.mark.parametrize(("credits", "extra", "key"), [
    ({"timezone": "Mars/Olympus"}, "", "credits.timezone"),
    ({"timezone": ""}, "", "credits.timezone"),
    ({"per_day": -1}, "", "credits.per_day"),
    ({"per_run": 1.5}, "", "credits.per_run"),
    ({"min_account_credits": "x"}, "", "credits.min_account_credits"),
    (None, '[run]\nmax_duration = "soon"', "run.max_duration"),
    (None, '[run]\nmax_duration = "0s"', "run.max_duration"),
    (None, '[run]\nmax_time = "1h"', "run.max_time"),
])
def test_a_bad_limit_is_refused_naming_its_key(tmp_path, sandbox, folder, credits, extra, key):
    job = write_job(tmp_path, sandbox, folder, credits=credits, extra=extra)
    res = invoke("run", str(job))
    assert res.exit_code == 2 and key in res.output, res.output
    assert sandbox.ledger() == []


@pytest.mark.parametrize("args", [("--max-duration", "soon"), ("--budget", "-1"),
                                  ("--max-credits", "lots")])
def test_a_bad_option_is_refused(tmp_path, sandbox, folder, args):
    res = invoke("run", str(write_job(tmp_path, sandbox, folder)), *args)
    assert res.exit_code == 2, res.output
    assert sandbox.ledger() == []


def test_durations_parse():
    from runner.job import parse_duration

    assert [parse_duration("k", d) for d in ("90s", "45m", "2h", "1h30m", "1h0m5s", "12")] == \
        [90, 2700, 7200, 5400, 3605, 12]


# --- budget: 0 spends nothing, none is no limit -------------------------------------------------

def test_budget_zero_spends_nothing_and_none_is_no_limit(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder)
    s = run_json(job, "--budget", "0", exit_code=3)
    assert s["status"] == "stopped_by_budget" and s["stopped_by"] == "budget"
    assert s["sent"] == 0 and s["pending"] == 10 and sandbox.ledger() == []
    job = write_job(tmp_path, sandbox, folder, credits={"budget": 0})
    assert run_json(job, exit_code=3)["sent"] == 0 and sandbox.ledger() == []
    assert status_json(job)["runs"][0]["status"] == "stopped_by_budget"
    s = run_json(job, "--budget", "none")
    assert s["done"] == 10 and s["budget"] is None and billed(sandbox) == 100


# --- per run ------------------------------------------------------------------------------------

def test_per_run_and_max_credits(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder, api={"batch_size": 4}, credits={"per_run": 30})
    s = run_json(job, exit_code=3)
    assert s["status"] == "stopped_by_per_run" and s["credits"] == 30 and s["pending"] == 7
    assert s["limits"]["per_run"] == {"limit": 30, "left": 0}
    assert "per_run 0 of 30" in s["message"]
    assert billed(sandbox) == 30
    # every run has its own allowance; --max-credits overrides it
    s = run_json(job, "--max-credits", "50", exit_code=3)
    assert s["credits"] == 50 and billed(sandbox) == 80
    assert run_json(job, "--max-credits", "none")["done"] == 2
    assert billed(sandbox) == 100


# --- per day and per month ----------------------------------------------------------------------

def test_two_runs_in_one_day_share_per_day_and_the_next_day_starts_afresh(
        tmp_path, sandbox, monkeypatch):
    make_images(tmp_path / "imgs", 12)
    job = write_job(tmp_path, sandbox, tmp_path / "imgs", api={"batch_size": 2},
                    credits={"per_day": 50, "timezone": "Europe/Prague"})
    first = run_json(job, exit_code=3)
    assert first["status"] == "stopped_by_per_day" and first["credits"] == 50
    second = run_json(job, exit_code=3)  # the same day: nothing left of its allowance
    assert second["sent"] == 0 and second["limits"]["per_day"]["left"] == 0
    assert billed(sandbox) == 50
    st = status_json(job)
    assert st["runs"][0]["status"] == "stopped_by_per_day"
    assert st["limits"]["per_day"]["left"] == 0 and st["limits"]["per_day"]["used"] == 50
    assert "per_day 0 left of 50" in invoke("status", str(job)).output
    real = datetime.now(UTC)
    monkeypatch.setattr(limits, "now", lambda: real + timedelta(days=1))
    third = run_json(job, exit_code=3)
    assert third["credits"] == 50 and billed(sandbox) == 100
    monkeypatch.setattr(limits, "now", lambda: real + timedelta(days=2))
    assert run_json(job)["credits"] == 20


def test_per_month_counts_the_calendar_month(tmp_path, sandbox, folder, monkeypatch):
    job = write_job(tmp_path, sandbox, folder, api={"batch_size": 1}, credits={"per_month": 40})
    assert run_json(job, exit_code=3)["credits"] == 40
    assert run_json(job, exit_code=3)["sent"] == 0
    real = datetime.now(UTC)
    monkeypatch.setattr(limits, "now", lambda: real + timedelta(days=32))
    assert run_json(job, exit_code=3)["credits"] == 40
    assert billed(sandbox) == 80


def test_a_run_that_crosses_midnight_gets_the_new_days_allowance_from_midnight(
        tmp_path, sandbox, monkeypatch):
    """23:57:30 in New York (04:57:30 UTC: no UTC midnight near), a minute per batch recorded."""
    make_images(tmp_path / "imgs", 10)
    tz = ZoneInfo("America/New_York")
    fake_clock(monkeypatch, datetime(2030, 3, 14, 23, 57, 30, tzinfo=tz))
    job = write_job(tmp_path, sandbox, tmp_path / "imgs", api={"batch_size": 1, "concurrency": 1},
                    credits={"per_day": 30, "timezone": "America/New_York"})
    s = run_json(job, exit_code=3)
    # Two answers recorded before midnight (at 23:57:30 and 23:58:30) and a third sent at 23:59:30
    # within the day's 30; that one's answer is recorded at 00:00:30, in the new day, which then
    # takes two more. In UTC (or in a run that ignored midnight) it would have stopped at 30.
    assert s["credits"] == 50 and s["status"] == "stopped_by_per_day"
    assert billed(sandbox) == 50 and len(sandbox.ledger()) == 5
    assert s["limits"]["per_day"] == {"limit": 30, "left": 0}


# --- what may have been billed without an answer -----------------------------------------------

def test_lost_answers_count_and_billing_stays_within_the_budget(tmp_path):
    make_images(tmp_path / "imgs", 150)
    with Sandbox(SandboxSettings(token=TOKEN, pdrop=0.3, seed=3)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api={"batch_size": 4, "concurrency": 4, "max_retries": 8},
                        credits={"budget": 1000})
        s = run_json(job, exit_code=3)
        lost = {e.request_no for e in sb.ledger() if not e.answered}
        assert lost  # answers were lost, and resent
        assert billed(sb) <= 1000, (billed(sb), s)
        assert s["status"] == "stopped_by_budget" and s["credits"] < 1000
        st = status_json(job)
        # the requests whose answer was lost stay on record as possibly billed, and count for
        # good: those whose images are still pending are open, the others history
        assert st["resends"]["requests_without_answer"] == len(lost)
        lost_records = sum(1 for e in sb.ledger() if not e.answered)
        assert st["credits"]["recorded"] + PER_IMAGE * lost_records \
            + st["limits"]["budget"]["left"] == 1000
        # another run with the same budget sends nothing more
        before = len(sb.ledger())
        assert run_json(job, exit_code=3)["sent"] <= st["limits"]["budget"]["left"] // PER_IMAGE
        assert billed(sb) <= 1000
        assert len(sb.ledger()) - before <= st["limits"]["budget"]["left"] // PER_IMAGE


@pytest.mark.slow
def test_a_killed_runs_requests_in_flight_count_against_the_next_runs_limits(tmp_path):
    make_images(tmp_path / "imgs", 30)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=1500)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=5, concurrency=2),
                        credits={"budget": 200, "per_day": 200})
        db = tmp_path / "state" / "t.db"
        child = start(tmp_path, "run", str(job), start_new_session=True)
        wait_for(lambda: db_count(db, "SELECT count(*) FROM attempts") >= 2, "two requests",
                 child)
        time.sleep(0.3)
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait()
        settle(sb)
        in_flight = db_count(db, "SELECT coalesce(sum(n), 0) FROM attempts "
                                 "WHERE closed_at IS NULL")
        assert in_flight >= 10
        left = 200 - in_flight * PER_IMAGE
        assert status_json(job)["limits"]["budget"]["left"] == left
        s = run_json(job, exit_code=3)
        # the killed run's requests were billed; the next run counts them and spends the rest
        assert s["credits"] == left
        assert billed(sb) == 200
        assert s["stopped_by"] in ("budget", "per_day")


@pytest.mark.slow
def test_repeated_kills_with_lost_answers_never_bill_past_the_budget(tmp_path):
    make_images(tmp_path / "imgs", 60)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=500, pdrop=0.3, seed=2)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=5, concurrency=3),
                        credits={"budget": 300})
        db = tmp_path / "state" / "t.db"
        for kill in range(4):
            child = start(tmp_path, "run", str(job), start_new_session=True)
            wait_for(lambda k=kill: db_count(db, "SELECT count(*) FROM runs") > k, "the run",
                     child)
            time.sleep(0.4 + 0.5 * kill)
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait()
            settle(sb)
            assert billed(sb) <= 300
        s = run_json(job, exit_code=3)
        assert s["status"] == "stopped_by_budget"
        assert billed(sb) <= 300
        st = status_json(job)
        assert billed(sb) >= st["credits"]["recorded"] > 0
        assert st["credits"]["recorded"] + PER_IMAGE * sum(
            len(u["keys"]) for u in st["possibly_billed_without_answer"]) <= 300


# --- the account's floor ------------------------------------------------------------------------

def test_min_account_credits_stops_before_the_account_falls_below(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 10)
    monkeypatch.setattr(limits, "ACCOUNT_REFRESH_BATCHES", 2)
    with Sandbox(SandboxSettings(token=TOKEN, credits=1000)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", api={"batch_size": 2},
                        credits={"min_account_credits": 960})
        s = run_json(job, exit_code=3)
        assert s["status"] == "stopped_by_account" and billed(sb) == 40
        assert "account 0 above the floor 960" in s["message"]
        assert run_json(job, exit_code=3)["sent"] == 0  # checked at the start


def test_min_account_credits_without_a_limit_from_the_api_says_so_once(tmp_path, sandbox,
                                                                       folder, monkeypatch,
                                                                       caplog):
    from runner.client import ApiClient

    monkeypatch.setattr(ApiClient, "account_details", lambda self: {"credits_counter": 5})
    monkeypatch.setattr(limits, "ACCOUNT_REFRESH_BATCHES", 1)
    job = write_job(tmp_path, sandbox, folder, api={"batch_size": 1},
                    credits={"min_account_credits": 100})
    res = invoke("run", str(job))
    assert res.exit_code == 0, res.output
    assert res.output.count("min_account_credits cannot apply") == 1


# --- the time window ----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["option", "job"])
def test_max_duration_ends_a_run_against_a_slow_api_within_the_window_and_one_request(
        tmp_path, how):
    make_images(tmp_path / "imgs", 40)
    latency = 0.6
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=latency * 1000)) as sb:
        extra = '[run]\nmax_duration = "2s"' if how == "job" else ""
        job = write_job(tmp_path, sb, tmp_path / "imgs", api={"batch_size": 1, "concurrency": 2},
                        extra=extra)
        args = ("--max-duration", "2s") if how == "option" else ()
        t0 = time.monotonic()
        s = run_json(job, *args, exit_code=3)
        took = time.monotonic() - t0
        assert s["status"] == "stopped_by_duration" and s["stopped_by"] == "duration"
        assert s["elapsed_s"] <= 2 + latency + 0.4, s["elapsed_s"]
        assert took <= 2 + latency + 1.5
        assert 0 < s["done"] < 40 and s["pending"] == 40 - s["done"]
        # everything the API answered was recorded
        assert {e.record_id for e in sb.ledger()} == {
            k for k, r in export_rows(job).items() if r["state"] == "done"}
        assert "time window" in s["message"]


# --- plan -----------------------------------------------------------------------------------------

def test_plan_shows_each_limit_and_where_it_would_stop_the_run(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder,
                    credits={"per_run": 30, "per_day": 1000, "budget": 70},
                    extra='[run]\nmax_duration = "1h30m"')
    p = plan_json(job)
    assert p["sent"] == 10
    assert p["limits"]["per_run"] == {"limit": 30, "left": 30, "stops_run": True,
                                      "images_before_stop": 3}
    assert p["limits"]["budget"]["stops_run"] and p["limits"]["budget"]["images_before_stop"] == 7
    assert not p["limits"]["per_day"]["stops_run"]
    assert p["limits"]["duration"] == {"limit": 5400}
    text = invoke("plan", str(job)).output
    assert "limit per_run 30, left 30: would stop the run after 3 image(s)" in text
    run_json(job, exit_code=3)
    p = plan_json(job)
    assert p["limits"]["budget"]["left"] == 40 and p["limits"]["per_day"]["used"] == 30
    assert json.dumps(p)  # plain JSON
