"""The whole runner against an API that throttles, fails, drops answers and refuses records.

Every test asserts from the emulator's ledger what was sent and how often, and from the database
what ximrun recorded: every image final, no `done` image sent twice except when an earlier answer
was lost, and credits recorded equal to what was answered.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from driver import (
    TOKEN,
    export_rows,
    invoke,
    jpeg,
    make_images,
    run_json,
    sends,
    status_json,
    write_job,
)

from runner import client
from runner.job import SandboxSettings
from runner.sandbox import Sandbox


def coloured_images(folder: Path, n: int, size=(48, 40)) -> None:
    """img000.jpg ...: n JPEGs of one colour each (the emulator's seeded faults follow the bytes)."""
    make_images(folder, n, name="img{:03d}.jpg",
                image=lambda i: jpeg((i * 7 % 256, i * 13 % 256, i * 29 % 256), size))


def check_ledger(sb: Sandbox, rows: dict[str, dict]) -> None:
    """No done image answered twice; every extra send of one is a request whose answer was lost."""
    entries = sb.ledger()
    answered_ok = Counter(e.record_id for e in entries if e.answered and e.code == 200)
    for key, row in rows.items():
        if row["state"] == "done" and not row["reused_from"]:
            assert answered_ok[key] == 1, (key, [e for e in entries if e.record_id == key])
            assert row["credits"] == 10
    billed = Counter(e.record_id for e in entries if e.billed)
    lost = Counter(e.record_id for e in entries if e.billed and not e.answered)
    for key, n in billed.items():
        done = rows[key]["state"] == "done"
        assert n == int(done) + lost[key], key
    db_credits = sum(r["credits"] for r in rows.values())
    assert db_credits == 10 * sum(answered_ok.values())


@pytest.mark.parametrize("faults", [
    dict(p429=0.3, retry_after_s=0.05),
    dict(p500=0.25, p502=0.1),
    pytest.param(dict(pdrop=0.5), marks=pytest.mark.slow),
    pytest.param(dict(precord_retry=0.3), marks=pytest.mark.slow),
    dict(rate_limit_rps=20),
    dict(latency_ms=20, jitter_ms=30, p429=0.1, retry_after_s=0.05, p500=0.1, pdrop=0.1,
         precord_retry=0.1),
], ids=["429", "5xx", "drop", "record-retry", "rate-limit", "mixed"])
def test_every_image_ends_final_despite_faults(tmp_path, faults):
    coloured_images(tmp_path / "imgs", 60)
    with Sandbox(SandboxSettings(token=TOKEN, seed=7, **faults)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api={"max_retries": 12, "concurrency": 4, "timeout_s": 10,
                             "batch_size": 4})
        run_json(job)
        rows = export_rows(job)
        assert len(rows) == 60 and all(r["state"] == "done" for r in rows.values())
        check_ledger(sb, rows)
        status = status_json(job)
        # every request whose answer was lost stays on record as possibly billed (it may have
        # been), and only those: history once its images were answered by a later request
        lost_requests = {e.request_no for e in sb.ledger() if not e.answered}
        assert status["possibly_billed_without_answer"] == []
        assert status["resends"]["requests_without_answer"] == len(lost_requests)
        # lost answers were resent; ximrun counted those sends, so the duplicates are visible
        lost = {e.record_id for e in sb.ledger() if not e.answered}
        if faults.get("pdrop", 0) >= 0.5:
            assert lost  # 15 requests at least, each answer lost with p = 0.5
        assert status["resends"]["images_sent_more_than_once"] >= len(lost & set(rows))
        # the rerun sends nothing
        before = len(sb.ledger())
        assert invoke("run", str(job)).exit_code == 0
        assert len(sb.ledger()) == before


def test_retries_exhausted_on_5xx_leave_pending_with_the_last_error_and_exit_69(tmp_path):
    coloured_images(tmp_path / "imgs", 5)
    with Sandbox(SandboxSettings(token=TOKEN, p500=1.0)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", api={"max_retries": 1})
        res = invoke("run", str(job))
        assert res.exit_code == 69, res.output
        rows = export_rows(job)
        # the service failed, not the records: pending, and the next plain run sends them
        assert all(r["state"] == "pending" and "500" in r["reason"] and r["sends"] == 2
                   for r in rows.values())
        assert sb.credits_used == 0
        # each batch was tried 1 + max_retries times
        assert sends(sb) == {k: 2 for k in rows}


def test_refused_records_fail_alone_and_their_neighbours_are_done(tmp_path):
    coloured_images(tmp_path / "imgs", 20)
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=0.3, seed=3)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs")
        assert invoke("run", str(job)).exit_code == 1
        rows = export_rows(job)
        failed = {k for k, r in rows.items() if r["state"] == "failed"}
        assert failed and len(failed) < 20
        assert all("Unable to load image" in rows[k]["reason"] for k in failed)
        # refused records are not retried: each was sent exactly once
        sent = sends(sb)
        assert all(sent[k] == 1 for k in failed)
        check_ledger(sb, rows)


def test_a_poisonous_record_is_isolated_by_bisection(tmp_path, monkeypatch):
    """A whole-request 400 caused by one record: the batch is split, nine neighbours are done."""
    coloured_images(tmp_path / "imgs", 9)
    manifest = tmp_path / "m.jsonl"
    lines = [json.dumps({"path": str(p), "id": p.name})
             for p in sorted((tmp_path / "imgs").iterdir())]
    lines.append(json.dumps({"path": str(tmp_path / "imgs" / "img000.jpg"), "id": "poison"}))
    manifest.write_text("\n".join(lines) + "\n")
    # `_url` next to `_base64` makes the API refuse the whole request. A manifest column cannot
    # carry it any more (names starting with "_" are refused): it is slipped into the body.
    build_body = client.build_body

    def poisoned(records, fields):
        records = [dataclasses.replace(r, extra={**r.extra, "_url": "http://127.0.0.1:9/x.jpg"})
                   if r.id == "poison" else r for r in records]
        return build_body(records, fields)

    monkeypatch.setattr(client, "build_body", poisoned)
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = write_job(tmp_path, sb, manifest=str(manifest), name="p", credits={"reuse": False})
        assert invoke("run", str(job)).exit_code == 1
        rows = export_rows(job)
        assert rows["poison"]["state"] == "failed" and "400" in rows["poison"]["reason"]
        assert sum(r["state"] == "done" for r in rows.values()) == 9


def test_too_large_image_is_resent_downscaled_once(tmp_path):
    coloured_images(tmp_path / "imgs", 3, size=(900, 700))
    (tmp_path / "imgs" / "tiny.jpg").write_bytes((tmp_path / "imgs" / "img000.jpg").read_bytes())
    with Sandbox(SandboxSettings(token=TOKEN, max_image_bytes=6000)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", images={"max_side": 1200},
                        credits={"reuse": False})
        res = invoke("run", str(job))
        rows = export_rows(job)
        assert res.exit_code == 0, (res.output, rows)
        assert all(r["result"]["_width"] < 900 for r in rows.values())
        assert Counter(e.code for e in sb.ledger())[413] == 4


def test_too_large_without_max_side_fails_with_the_reason(tmp_path):
    coloured_images(tmp_path / "imgs", 2, size=(900, 700))
    with Sandbox(SandboxSettings(token=TOKEN, max_image_bytes=3000)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs")
        assert invoke("run", str(job)).exit_code == 1
        rows = export_rows(job)
        assert all(r["state"] == "failed" and "413" in r["reason"] for r in rows.values())


def test_account_counter_is_read_before_and_after(tmp_path):
    coloured_images(tmp_path / "imgs", 12)
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs")
        s = run_json(job)
        assert s["account_after"] - s["account_before"] == s["credits"] == 120
        st = status_json(job)
        assert st["credits"]["last_run_account_difference"] == 120
