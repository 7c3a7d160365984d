"""Every number agrees with every other: items.sends, status's resend figures, the attempts
ledger and the emulator's ledger after kills; what status calls open and what it calls history;
the summary printed, `run --json` and the `runs` row for every exit path; the account's counter
against the credits recorded.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from driver import (
    CHILD_API,
    TOKEN,
    attempts_per_key,
    export_rows,
    invoke,
    make_images,
    settle,
    start,
    status_json,
    wait_for,
    write_job,
)

from runner.job import SandboxSettings
from runner.sandbox import Sandbox


def open_attempts(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM attempts WHERE closed_at IS NULL").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


@pytest.mark.slow
def test_after_kills_sends_status_and_both_ledgers_agree_image_by_image(tmp_path):
    make_images(tmp_path / "imgs", 240)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=250, seed=3)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=5, concurrency=4))
        db = tmp_path / "state" / "t.db"
        for kill in range(3):
            first = len(sb.ledger())
            child = start(tmp_path, "run", str(job), tag="kill")
            wait_for(lambda: len(sb.ledger()) >= first + 20  # noqa: B023
                     and open_attempts(db) >= 3, f"requests in flight (kill {kill + 1})", child)
            child.proc.send_signal(signal.SIGKILL)
            child.wait()
            settle(sb)
            # Right after the kill, the images in flight are open, and already counted as sent.
            st = status_json(job)
            assert st["possibly_billed_without_answer"], "nothing was in flight at the kill"
            rows = export_rows(job)
            for u in st["possibly_billed_without_answer"]:
                assert all(rows[k]["sends"] >= 1 for k in u["keys"])
        res = invoke("run", str(job))
        assert res.exit_code == 0, res.output
        ledger = settle(sb)

        rows = export_rows(job)
        attempts = attempts_per_key(db)
        seen = Counter(e.record_id for e in ledger)
        assert all(r["state"] == "done" for r in rows.values())
        # One truth: items.sends is the attempts ledger, image by image ...
        assert {k: r["sends"] for k, r in rows.items() if r["sends"]} == dict(attempts)
        # ... and never less than what the service saw (a killed request may not have reached it).
        under = {k: (rows[k]["sends"], n) for k, n in seen.items() if rows[k]["sends"] < n}
        assert not under, f"ximrun under-counts what the emulator saw: {under}"
        twice = {k for k, r in rows.items() if r["sends"] > 1}
        assert twice, "no image was resent: the kills came too late"
        st = status_json(job)
        assert st["resends"]["images_sent_more_than_once"] == len(twice)
        assert st["resends"]["extra_sends"] == sum(r["sends"] - 1 for r in rows.values()
                                                   if r["sends"])
        assert st["resends"]["requests_without_answer"] >= 3
        # Everything was answered since: nothing is open any more, the rest is history.
        assert st["possibly_billed_without_answer"] == []
        text = invoke("status", str(job)).output
        assert "possibly billed without an answer" not in text
        assert f"history: {len(twice)} image(s) sent more than once" in text


# --- the summary, run --json, status and the runs row: the same numbers on every exit path ------

ROW_FIELDS = ("listed", "requests", "sent", "done", "failed", "rejected", "reused", "credits",
              "credits_saved", "status", "exit_code")


def runs_row(db: Path, run_id: int) -> dict:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
    finally:
        conn.close()


def assert_same_numbers(job: Path, db: Path, summary: dict) -> None:
    row = runs_row(db, summary["run_id"])
    assert {k: row[k] for k in ROW_FIELDS} == {k: summary[k] for k in ROW_FIELDS}
    shown = next(r for r in status_json(job)["runs"] if r["id"] == summary["run_id"])
    assert {k: shown[k] for k in shown if k in ROW_FIELDS} == \
        {k: summary[k] for k in shown if k in ROW_FIELDS}


def copies(folder: Path, n: int) -> None:
    """n images, each twice, next to each other in the listing: the copy waits for its original
    in the same batch (a follower)."""
    for p in make_images(folder, n):
        (folder / f"{p.stem}b.jpg").write_bytes(p.read_bytes())


def test_followers_count_as_done_in_the_runs_row_as_in_the_summary(tmp_path, sandbox):
    copies(tmp_path / "imgs", 10)
    job = write_job(tmp_path, sandbox, tmp_path / "imgs", api={"batch_size": 10})
    res = invoke("run", str(job), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["done"] == 20 and summary["reused"] == 10
    assert_same_numbers(job, tmp_path / "state" / "t.db", summary)


@pytest.mark.parametrize("case", ["failures", "limit", "auth", "unavailable"])
def test_every_exit_path_records_the_numbers_it_prints(tmp_path, case):
    copies(tmp_path / "imgs", 15)
    settings = {"failures": SandboxSettings(token=TOKEN, prefuse=0.3, seed=1),
                "unavailable": SandboxSettings(token=TOKEN, p500=1.0)}.get(
                    case, SandboxSettings(token=TOKEN))
    api = {"batch_size": 4, "concurrency": 2}
    if case == "unavailable":
        api.update(max_retries=0, breaker_failures=1)
    with Sandbox(settings) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", api=api)
        args = ["--limit", "9"] if case == "limit" else []
        env = {"XIMILAR_TOKEN": "wrong"} if case == "auth" else None
        res = invoke("run", str(job), "--json", *args, env=env)
    expected = {"failures": 1, "limit": 3, "auth": 5, "unavailable": 69}[case]
    assert res.exit_code == expected, res.output
    summary = json.loads(res.stdout)
    assert_same_numbers(job, tmp_path / "state" / "t.db", summary)


@pytest.mark.slow
def test_a_stop_signal_records_the_listing_it_prints(tmp_path):
    # Chunks classified ahead of the stop are recorded as listed, their images pending: the
    # summary counts them too.
    make_images(tmp_path / "imgs", 900)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=400, seed=2)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=2, concurrency=2))
        db = tmp_path / "state" / "t.db"
        child = start(tmp_path, "run", str(job), "--json")
        wait_for(lambda: open_attempts(db) >= 2 and len(sb.ledger()) >= 4, "requests", child)
        child.proc.send_signal(signal.SIGINT)
        assert child.wait() == 4, child.output()
        summary = json.loads(child.stdout)
        assert 0 < summary["done"] < summary["listed"] < 900
        assert summary["pending"] == summary["listed"] - summary["done"]
        assert_same_numbers(job, db, summary)


# --- the account's counter against the credits recorded -----------------------------------------

def test_a_counter_that_moved_more_than_recorded_is_warned_about_and_recorded(tmp_path):
    make_images(tmp_path / "imgs", 12)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs", credits={"per_image": 2},
                    extra="[sandbox]\ncredits_per_record = 10")
    res = invoke("run", str(job), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["credits"], summary["account_after"] - summary["account_before"]) == (24, 120)
    assert summary["account_gap"] == 96
    warned = [line for line in res.stderr.splitlines() if "credit counter moved" in line]
    assert len(warned) == 1, res.stderr
    assert "96 more than recorded" in warned[0] and "set per_image = 10" in warned[0]
    row = runs_row(tmp_path / "state" / "t.db", summary["run_id"])
    assert row["account_gap"] == 96
    st = status_json(job)
    assert st["credits"]["last_run_account_gap"] == 96 and st["runs"][0]["account_gap"] == 96
    assert "+96 against what was recorded" in invoke("status", str(job)).output


def test_a_counter_that_agrees_is_no_warning(tmp_path):
    make_images(tmp_path / "imgs", 5)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs", credits={"per_image": 10})
    res = invoke("run", str(job), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["account_gap"] == 0
    assert "credit counter moved" not in res.stderr
