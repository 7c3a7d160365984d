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


def attempts_per_key(db: Path) -> Counter[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return Counter(k for (keys,) in conn.execute("SELECT keys FROM attempts")
                       for k in json.loads(keys))
    finally:
        conn.close()


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
