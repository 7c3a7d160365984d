"""Graceful stops, the run lock, cron output and secrets: the real CLI in a subprocess.

SIGINT/SIGTERM finish the requests in flight, record them and exit 4; a second SIGINT leaves at
once; a second run of one database exits 75 naming the pid while status, plan and export still
work; under cron (stderr not a terminal) the output is plain lines; the token is nowhere.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import secrets
import signal
import struct
import termios
import threading
from collections import Counter
from pathlib import Path

import pytest
from driver import (
    CHILD_API,
    TOKEN,
    child_env,
    db_count,
    export_rows,
    integrity,
    invoke,
    make_images,
    plan_json,
    sends,
    settle,
    start,
    status_json,
    wait_for,
    write_job,
    ximrun,
)

from runner.job import SandboxSettings
from runner.sandbox import Sandbox


def open_attempts(db: Path) -> int:
    """Requests announced and not yet recorded, read while the run writes (0 before the db)."""
    return db_count(db, "SELECT count(*) FROM attempts WHERE closed_at IS NULL")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_records_the_batches_in_flight_and_exits_4(tmp_path, sig):
    make_images(tmp_path / "imgs", 80)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300, seed=5)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=4, concurrency=3))
        db = tmp_path / "state" / "t.db"
        child = start(tmp_path, "run", str(job), "--json")
        wait_for(lambda: open_attempts(db) >= 2, "requests in flight", child)
        child.proc.send_signal(sig)
        assert child.wait() == 4, child.output()
        summary = json.loads(child.stdout)
        assert (summary["status"], summary["exit_code"]) == ("interrupted", 4)
        assert summary["pending"] > 0 and summary["done"] > 0
        assert f"{sig.name} received" in child.stderr
        assert "Traceback" not in child.stderr

        ledger = settle(sb)
        assert integrity(db, tmp_path / "check") == "ok"
        rows = export_rows(job)
        # Every answer the API gave was recorded: nothing billed and answered is left pending.
        for e in ledger:
            assert rows[e.record_id]["state"] == "done", (e, rows[e.record_id])
        assert summary["done"] == len(ledger)
        assert status_json(job)["possibly_billed_without_answer"] == []

        res = invoke("run", str(job))
        assert res.exit_code == 0, res.output
        # A graceful stop costs nothing twice: every image was sent exactly once.
        sent = sends(sb)
        assert set(sent) == set(rows) and set(sent.values()) == {1}


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler of its own for sig (Linux: SigCgt in /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except FileNotFoundError:
        pass
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_start_up_is_a_clean_exit_with_nothing_sent(tmp_path, sig):
    # The signal lands while click and the pipeline are still being imported. Python catches
    # SIGINT from its first instant, SIGTERM only once ximrun does: that says it is listening.
    make_images(tmp_path / "imgs", 6)
    with Sandbox(SandboxSettings(token=TOKEN, seed=5)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=2, concurrency=1))
        child = start(tmp_path, "run", str(job), "--json")
        wait_for(lambda: catches(child.proc.pid, signal.SIGTERM), "a signal handler", child)
        child.proc.send_signal(sig)
        assert child.wait() == 4, child.output()
        assert "Traceback" not in child.stderr
        assert "a stop signal came while starting" in child.stderr
        assert json.loads(child.stdout)["status"] == "interrupted"
        assert sb.ledger() == []

        other = start(tmp_path, "status", str(job), tag="status")
        wait_for(lambda: catches(other.proc.pid, signal.SIGTERM), "a signal handler", other)
        other.proc.send_signal(sig)
        assert other.wait() == 130, other.output()
        assert "Traceback" not in other.stderr

        res = invoke("run", str(job))
        assert res.exit_code == 0, res.output
        assert len(sb.ledger()) == 6


@pytest.mark.slow
def test_a_second_sigint_leaves_at_once(tmp_path):
    make_images(tmp_path / "imgs", 8)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=8000)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=2, concurrency=2))
        db = tmp_path / "state" / "t.db"
        child = start(tmp_path, "run", str(job))
        wait_for(lambda: open_attempts(db) >= 2, "requests in flight", child)
        child.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT received" in child.stderr, "the first SIGINT", child)
        child.proc.send_signal(signal.SIGINT)
        # 130, not 4: it did not wait the 8 s for the answers in flight.
        assert child.wait(timeout=20) == 130, child.output()
        assert integrity(db, tmp_path / "check") == "ok"
        named = {k for u in status_json(job)["possibly_billed_without_answer"] for k in u["keys"]}
        assert len(named) == 4
        assert all(r["state"] == "pending" for r in export_rows(job).values())
        # recorded as aborted, not crashed; the next run finishes the job
        last = status_json(job)["runs"][0]
        assert (last["status"], last["exit_code"]) == ("aborted", 130)
        res = invoke("run", str(job))
        assert res.exit_code == 0, res.output
        rows = export_rows(job)
        assert len(rows) == 8 and all(r["state"] == "done" for r in rows.values())
        # only the requests in flight at the abort were sent twice
        assert max(Counter(e.record_id for e in settle(sb)).values()) <= 2


@pytest.mark.slow
def test_one_run_at_a_time_and_readers_work_meanwhile(tmp_path):
    make_images(tmp_path / "imgs", 60)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=200)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=1, concurrency=1))
        db = tmp_path / "state" / "t.db"
        first = start(tmp_path, "run", str(job), tag="first")
        wait_for(lambda: open_attempts(db) >= 1, "the first run's requests", first)

        second = ximrun(tmp_path, "run", str(job), tag="second")
        assert second.proc.returncode == 75, second.output()
        assert f"pid {first.proc.pid}" in second.stderr
        st = ximrun(tmp_path, "status", str(job), "--json")
        assert st.proc.returncode == 0, st.output()
        assert json.loads(st.stdout)["runs"][0]["status"] == "running"
        assert len(json.loads(st.stdout)["runs"]) == 1  # the second run never began
        plan = ximrun(tmp_path, "plan", str(job), "--json")
        assert plan.proc.returncode == 0, plan.output()
        assert json.loads(plan.stdout)["listed"] == 60
        exp = ximrun(tmp_path, "export", str(job), "--format", "csv")
        assert exp.proc.returncode == 0, exp.output()
        assert len(exp.stdout.splitlines()) == 61
        assert first.proc.poll() is None, "the first run ended too soon to prove the lock"

        first.proc.send_signal(signal.SIGTERM)
        assert first.wait() == 4, first.output()
        # The lock died with its holder: the next run starts (and stops at its limit).
        assert ximrun(tmp_path, "run", str(job), "--limit", "1").proc.returncode == 3


@pytest.mark.slow
def test_under_cron_plain_progress_lines_even_while_a_request_hangs(tmp_path):
    make_images(tmp_path / "imgs", 6)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=3000)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=10, concurrency=1))
        child = start(tmp_path, "run", str(job), env=child_env(XIMRUN_RUN_STATS="0.1"))
        assert child.wait() == 0, child.output()
    out, err = child.stdout, child.stderr
    assert "\r" not in out + err
    progress = [line for line in err.splitlines() if "progress:" in line]
    # One request of 3 s, a line every 0.1 s: a heartbeat, not only a line per answer.
    assert len(progress) >= 3, err
    assert "finished" in out and "done 6" in out


@pytest.mark.slow
def test_under_cron_a_faulty_run_is_short_enough_to_mail(tmp_path):
    make_images(tmp_path / "imgs", 200)
    with Sandbox(SandboxSettings(token=TOKEN, p500=0.05, p429=0.03, retry_after_s=0.05,
                                 pdrop=0.02, seed=11)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=5, concurrency=4))
        child = start(tmp_path, "run", str(job))
        assert child.wait() == 0, child.output()
    lines = (child.stdout + child.stderr).splitlines()
    assert "\r" not in child.stdout + child.stderr
    assert len(lines) <= 40, "\n".join(lines)


@pytest.mark.slow
def test_on_a_terminal_a_progress_bar(tmp_path):
    make_images(tmp_path / "imgs", 20)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=20)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=2, concurrency=2))
        leader, follower = pty.openpty()
        # A terminal 100 columns wide (a fresh pty has none, and a bar needs some).
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(leader, 4096)
                except OSError:  # the terminal's other end closed
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            child = start(tmp_path, "run", str(job), stderr=follower)
            os.close(follower)
            assert child.wait() == 0, child.output()
        finally:
            reader.join(10)
            os.close(leader)
    tty = b"".join(chunks).decode(errors="replace")
    assert "\r" in tty and "img" in tty and "progress:" not in tty
    assert "\r" not in child.stdout  # the summary stays plain


def test_retry_puts_failed_images_back_by_reason(tmp_path):
    make_images(tmp_path / "imgs", 12)
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=0.5, seed=2)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=4, concurrency=2))
        assert invoke("run", str(job)).exit_code == 1
        failed = {k for k, r in export_rows(job).items() if r["state"] == "failed"}
        assert failed
        assert invoke("retry", str(job), "--reason", "no such reason").output.startswith(
            "ximrun: 0 failed")
        assert status_json(job)["states"]["failed"] == len(failed)
        res = invoke("retry", str(job), "--reason", "Unable to load")
        assert f"{len(failed)} failed image(s) back to pending" in res.output
        assert status_json(job)["states"]["pending"] == len(failed)
        plan = plan_json(job)
        assert plan["retried"] == len(failed)
        before = len(sb.ledger())
        assert invoke("run", str(job)).exit_code == 1  # the API refuses the same bytes again
        assert {e.record_id for e in sb.ledger()[before:]} == failed


@pytest.mark.slow
def test_the_token_is_in_no_artefact_of_a_run(tmp_path):
    token = "xr-" + secrets.token_hex(20)
    wrong = "xr-wrong-" + secrets.token_hex(12)
    make_images(tmp_path / "imgs", 20)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    settings = SandboxSettings(token=token, p500=0.1, p502=0.1, pdrop=0.05, prefuse=0.2, seed=9)
    with Sandbox(settings) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=5, concurrency=2))
        refused = start(tmp_path, "run", str(job), "-vv", env=child_env(wrong), tag="refused")
        assert refused.wait() == 5, refused.output()
        assert "refused the token" in refused.stdout + refused.stderr
        ran = start(tmp_path, "run", str(job), "-vv", env=child_env(token), tag="ran")
        assert ran.wait() == 1, ran.output()  # some records refused: failed, exit 1
        stopped = start(tmp_path, "run", str(job), "--json", env=child_env(token), tag="json")
        assert stopped.wait() == 1, stopped.output()
        for n, args in enumerate([("status",), ("status", "--json"), ("plan",), ("retry",),
                                  ("export", "-o", str(tmp_path / "export.jsonl")),
                                  ("export", "--format", "csv", "-o", str(tmp_path / "export.csv"))]):
            res = invoke(args[0], str(job), *args[1:], env={"XIMILAR_TOKEN": token})
            assert res.exit_code == 0, res.output
            (tmp_path / f"{args[0]}-{n}.txt").write_text(res.output)
    artefacts = [p for p in tmp_path.rglob("*") if p.is_file() and "imgs" not in p.parts]
    names = {p.name for p in artefacts}
    assert {"t.db", "t.db.lock", "export.jsonl", "export.csv"} <= names
    assert any(p.name.endswith(".err") and p.stat().st_size for p in artefacts)
    for p in artefacts:
        data = p.read_bytes()
        for secret in (token, wrong):
            assert secret.encode() not in data, f"the token leaked into {p.name}"


@pytest.mark.parametrize("raw,code", [("{t}\n", 0), (" {t} ", 0), ("{t}\u2019", 2),
                                      ("{t} x", 2), ("{t}\r\nX-Evil: 1", 2)],
                         ids=["newline", "spaces", "non-ascii", "inner-space", "header-injection"])
def test_a_token_that_cannot_be_a_header_is_trimmed_or_refused_unseen(tmp_path, raw, code):
    token = "xr-" + secrets.token_hex(16)
    make_images(tmp_path / "imgs", 3)
    with Sandbox(SandboxSettings(token=token)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=5, concurrency=1))
        res = invoke("run", str(job), env={"XIMILAR_TOKEN": raw.format(t=token)})
        assert res.exit_code == code, res.output
        assert token not in res.output
        if code == 2:
            assert "api.token_env" in res.output and sb.ledger() == []
        db = tmp_path / "state" / "t.db"
        for f in db.parent.glob("*") if db.parent.exists() else ():
            assert token.encode() not in f.read_bytes(), f.name
