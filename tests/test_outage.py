"""An API that is down is not the records' fault: through the CLI, against a closed port and the
emulator, images hit by failures of the service stay pending and the next plain run sends them.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from driver import TOKEN, export_rows, invoke, make_images, plan_json, status_json

from runner.client import ApiClient
from runner.job import ApiConfig, SandboxSettings
from runner.sandbox import Sandbox
from runner.transport import Breaker


def closed_port() -> int:
    """A loopback port where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_file(tmp: Path, endpoint: str, src: Path, api_extra: str = "") -> Path:
    job = tmp / "outage.toml"
    job.write_text(f'''
name = "outage"
[source]
paths = ["{src}"]
[api]
endpoint = "{endpoint}"
{api_extra}
[state]
db = "state/outage.db"
''')
    return job


def test_an_outage_leaves_every_image_pending_and_the_next_plain_run_sends_them(tmp_path):
    make_images(tmp_path / "imgs", 40)
    down = f"http://127.0.0.1:{closed_port()}/collectibles/v2/tcg_id"
    job = job_file(tmp_path, down, tmp_path / "imgs", "max_retries = 1\nbatch_size = 10")
    res = invoke("run", str(job), "--json")
    assert res.exit_code == 69, res.output
    summary = json.loads(res.stdout)
    assert summary["failed"] == 0 and summary["pending"] == 40 and summary["unavailable"] == 40
    rows = export_rows(job)
    assert len(rows) == 40
    assert all(r["state"] == "pending" for r in rows.values())
    assert all(r["reason"].startswith("connection failed") for r in rows.values())
    # the next run would send them all again, without `ximrun retry`
    plan = plan_json(job)
    assert plan["sent"] == 40 and plan["kept_failed"] == 0

    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = job_file(tmp_path, sb.endpoint_url(), tmp_path / "imgs")
        res = invoke("run", str(job), "--json")
        assert res.exit_code == 0, res.output
        rows = export_rows(job)
        assert all(r["state"] == "done" and r["reason"] is None for r in rows.values())
        assert Counter(e.record_id for e in sb.ledger()) == {k: 1 for k in rows}


def test_records_the_service_keeps_failing_stay_pending_while_refused_ones_fail(tmp_path):
    """Per-record 5xx until the retries run out is the service's failure; a 400 is the record's."""
    make_images(tmp_path / "imgs", 20)
    with Sandbox(SandboxSettings(token=TOKEN, precord_retry=1.0)) as sb:
        job = job_file(tmp_path, sb.endpoint_url(), tmp_path / "imgs", "max_retries = 1")
        res = invoke("run", str(job))
        assert res.exit_code == 69, res.output
        assert "pending 20 (20 after failures of the service)" in res.output
        rows = export_rows(job)
        assert all(r["state"] == "pending" and r["reason"].startswith("api 50")
                   for r in rows.values())
        assert all(r["sends"] == 2 for r in rows.values())
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=0.3, seed=3)) as sb:
        job = job_file(tmp_path, sb.endpoint_url(), tmp_path / "imgs")
        assert invoke("run", str(job)).exit_code == 1
        rows = export_rows(job)
        failed = {k for k, r in rows.items() if r["state"] == "failed"}
        assert failed and all("Unable to load image" in rows[k]["reason"] for k in failed)
        assert all(r["state"] == "done" for k, r in rows.items() if k not in failed)


# --- the circuit breaker ---------------------------------------------------------------------------

DOCUMENTED_BOUND_S = 30  # README: refused connections, with the defaults


def test_a_closed_port_opens_the_breaker_well_within_the_bound_and_a_rerun_finishes(tmp_path):
    make_images(tmp_path / "imgs", 200)
    down = f"http://127.0.0.1:{closed_port()}/collectibles/v2/tcg_id"
    job = job_file(tmp_path, down, tmp_path / "imgs")  # every [api] key at its default
    started = time.monotonic()
    res = invoke("run", str(job), "--json")
    took = time.monotonic() - started
    assert res.exit_code == 69, res.output
    assert took < DOCUMENTED_BOUND_S, took  # about 11 s here: 5 batches out of retries
    summary = json.loads(res.stdout)
    assert summary["status"] == "api_unavailable" and summary["failed"] == 0
    assert "unavailable since" in summary["message"]
    assert "connection failed" in summary["message"]
    rows = export_rows(job)
    assert rows and all(r["state"] == "pending" for r in rows.values())
    assert status_json(job)["states"]["failed"] == 0

    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = job_file(tmp_path, sb.endpoint_url(), tmp_path / "imgs")
        res = invoke("run", str(job))
        assert res.exit_code == 0, res.output
        rows = export_rows(job)
        assert len(rows) == 200 and all(r["state"] == "done" for r in rows.values())
        assert Counter(e.record_id for e in sb.ledger()) == {k: 1 for k in rows}


def test_breaker_s_bounds_a_run_whatever_max_retries_says(tmp_path):
    """Every request answered 500: after breaker_s the retries stop, in flight or not."""
    make_images(tmp_path / "imgs", 40)
    with Sandbox(SandboxSettings(token=TOKEN, p500=1.0)) as sb:
        job = job_file(tmp_path, sb.endpoint_url(), tmp_path / "imgs",
                       "max_retries = 100\nbreaker_failures = 1000\nbreaker_s = 1.5")
        started = time.monotonic()
        res = invoke("run", str(job), "--json")
        took = time.monotonic() - started
        assert res.exit_code == 69, res.output
        assert took < 1.5 + 3, took
        summary = json.loads(res.stdout)
        assert summary["status"] == "api_unavailable"
        assert "every request failed for 1.5s" in summary["message"]
        assert "http 500" in summary["message"]
        rows = export_rows(job)
        assert all(r["state"] == "pending" for r in rows.values())
        assert sb.credits_used == 0


def test_a_service_that_hangs_is_given_up_within_breaker_s_plus_two_time_outs(tmp_path):
    """Connections are accepted (by the kernel) and never answered: every request times out."""
    make_images(tmp_path / "imgs", 40)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(128)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/collectibles/v2/tcg_id"
        job = job_file(tmp_path, url, tmp_path / "imgs",
                       "max_retries = 100\nbreaker_failures = 1000\nbreaker_s = 2\n"
                       "timeout_s = 1\nconcurrency = 4")
        started = time.monotonic()
        res = invoke("run", str(job), "--json")
        took = time.monotonic() - started
    assert res.exit_code == 69, res.output
    assert took < 2 + 2 * 1 + 1.5, took  # README's bound, and a little for the run's own work
    summary = json.loads(res.stdout)
    assert "every request failed for 2s" in summary["message"]
    assert "timeout after 1s" in summary["message"]
    rows = export_rows(job)
    assert all(r["state"] == "pending" for r in rows.values())
    # these requests did connect: they may have been billed, so they count
    assert summary["requests"] > 0 and all(r["sends"] >= 1 for r in rows.values()
                                           if r["reason"])


@pytest.mark.parametrize("line, message", [
    ("breaker_failures = 0", "api.breaker_failures: 0 is out of range (1..1000)"),
    ("breaker_s = 0.0", "api.breaker_s: 0.0 is out of range (0.1..3600)"),
    ("breaker_s = true", "api.breaker_s: expected a number"),
])
def test_breaker_keys_are_checked(tmp_path, line, message):
    make_images(tmp_path / "imgs", 1)
    job = job_file(tmp_path, "sandbox", tmp_path / "imgs", line)
    res = invoke("run", str(job))
    assert res.exit_code == 2 and message in res.output, res.output


def test_the_breaker_counts_batches_in_a_row_and_times_failing_requests():
    now = [100.0]
    b = Breaker(3, 10.0, clock=lambda: now[0])
    b.batch_done(False, "http 503: down")
    b.batch_done(False, "http 503: down")
    b.batch_done(True)  # a record answered: the count starts again
    b.batch_done(False, "http 503: down")
    b.batch_done(False, "http 503: down")
    assert not b.is_open()
    b.batch_done(False, "http 503: down")
    assert b.is_open() and "3 batch(es) in a row" in b.why and "http 503: down" in b.why

    b = Breaker(5, 10.0, clock=lambda: now[0])
    b.ended(b.began(), "connection failed (refused)")
    now[0] += 9
    assert not b.is_open()
    b.ended(b.began())  # the service answered: the window starts again
    b.ended(b.began(), "connection failed (refused)")
    slow = b.began()  # a slow request in flight may yet be answered: no verdict without it
    now[0] += 15
    assert not b.is_open()
    b.ended(slow)
    assert not b.is_open()
    # failures for 10s: a late failure opens it, or the time alone once nothing is in flight
    b.ended(b.began(), "http 503: down")
    now[0] += 10
    b.ended(b.began(), "http 503: down")
    assert b.is_open() and "every request failed for 10s" in b.why
    b = Breaker(5, 10.0, clock=lambda: now[0])
    b.ended(b.began(), "http 429: slow down")  # then everyone waits out a long Retry-After
    now[0] += 10
    assert b.is_open() and "http 429: slow down" in b.why


# --- a request that never connected is not a send -----------------------------------------------


def test_requests_that_never_connected_are_not_sends_nor_possibly_billed(tmp_path):
    make_images(tmp_path / "imgs", 30)
    down = f"http://127.0.0.1:{closed_port()}/collectibles/v2/tcg_id"
    job = job_file(tmp_path, down, tmp_path / "imgs", "max_retries = 2")
    res = invoke("run", str(job))
    assert res.exit_code == 69, res.output
    assert "sent 0 in 0 request(s)" in res.output
    rows = export_rows(job)
    assert all(r["state"] == "pending" and r["sends"] == 0 for r in rows.values())
    st = status_json(job)
    assert st["possibly_billed_without_answer"] == []
    assert st["resends"] == {"images_sent_more_than_once": 0, "extra_sends": 0,
                             "requests_without_answer": 0, "images_in_requests_without_answer": 0}
    with sqlite3.connect(tmp_path / "state" / "outage.db") as db:
        assert db.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0
        assert db.execute("SELECT requests, sent FROM runs").fetchall() == [(0, 0)]


def test_the_attempt_row_is_written_before_and_taken_back_after_a_refused_connection():
    from test_client import records

    calls: list[tuple[str, list[str], int]] = []
    api = ApiConfig(max_retries=2, connect_timeout_s=2.0)
    with ApiClient(f"http://127.0.0.1:{closed_port()}/collectibles/v2/tcg_id", TOKEN, api,
                   sleep=lambda s: None) as client:
        out = client.submit_batch(
            records(2), on_attempt=lambda ids, n: calls.append(("attempt", list(ids), n)),
            on_unsent=lambda ids, n: calls.append(("unsent", list(ids), n)))
    ids = [o.id for o in out]
    assert calls == [("attempt", ids, 1), ("unsent", ids, 1)] * 3
    assert all(o.unavailable and o.attempts == 0 for o in out)
    assert out[0].reason.startswith("connection failed")


def test_a_proxy_that_cannot_be_reached_is_no_send(monkeypatch):
    from test_client import records

    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    unsent: list[int] = []
    with Sandbox(SandboxSettings(token=TOKEN)) as sb, \
            ApiClient(sb.endpoint_url(), TOKEN, ApiConfig(max_retries=1),
                      sleep=lambda s: None) as client:
        out = client.submit_batch(records(1), on_unsent=lambda ids, n: unsent.append(n))
        assert sb.ledger() == []
    assert unsent == [1, 1] and out[0].attempts == 0 and out[0].unavailable
