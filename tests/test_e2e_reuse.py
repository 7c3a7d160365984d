"""End to end: never pay twice for the same pixels. The real CLI against the emulator over HTTP,
local folders and moto's S3 server; the emulator's ledger says what was really sent."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from driver import export_rows, jpeg, plan_json, run_json, status_json, write_job

DB = "state.db"  # every job here shares one state database

RED, GREEN, BLUE, GREY = (jpeg(c) for c in [(200, 20, 20), (20, 200, 20), (20, 20, 200),
                                            (90, 90, 90)])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three distinct images, one of them also under two more names."""
    d = tmp_path / "imgs"
    d.mkdir()
    for name, data in [("red.jpg", RED), ("red copy.jpg", RED), ("sub/red-sku.jpg", RED),
                       ("green.jpg", GREEN), ("blue.jpg", BLUE)]:
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_bytes(data)
    return d


def test_one_request_record_per_distinct_content_across_a_folder_and_s3(tmp_path, sandbox,
                                                                        folder, s3_bucket):
    s3_bucket.put_many({"x/red.jpg": RED, "x/blue again.jpg": BLUE, "x/grey.jpg": GREY})
    job = write_job(tmp_path, sandbox, [folder, s3_bucket.url("x/")], db=DB,
                    storage_options=s3_bucket.storage_options)

    plan = plan_json(job)
    s = run_json(job)

    ledger = sandbox.ledger()
    assert Counter(e.content_sha256 for e in ledger) == Counter(
        {_sha(RED): 1, _sha(GREEN): 1, _sha(BLUE): 1, _sha(GREY): 1})
    assert (s["listed"], s["sent"], s["done"], s["reused"]) == (8, 4, 8, 4)
    assert s["credits"] == plan["credits"] == 40 and s["credits_saved"] == 40
    rows = export_rows(job)
    for content in (RED, BLUE):
        copies = [r for r in rows.values() if r["content_hash"] == _sha(content)]
        paid = [r for r in copies if r["reused_from"] is None]
        assert len(paid) == 1 and paid[0]["credits"] == 10
        assert all(r["state"] == "done" and r["credits"] == 0 and r["reused_from"] == paid[0]["key"]
                   and r["result"] == {**paid[0]["result"], "_id": r["key"]}
                   for r in copies if r is not paid[0])
    st = status_json(job)
    assert st["reused"] == 4
    assert (st["credits"]["recorded"], st["credits"]["saved_by_reuse"]) == (40, 40)


def test_a_second_job_on_the_same_database_sends_nothing_for_known_bytes(tmp_path, sandbox,
                                                                         folder):
    first = write_job(tmp_path, sandbox, folder, name="first", db=DB)
    run_json(first)
    sent_before = len(sandbox.ledger())
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "red.jpg", other / "r.jpg")
    shutil.copy(folder / "blue.jpg", other / "b.jpg")
    (other / "grey.jpg").write_bytes(GREY)
    second = write_job(tmp_path, sandbox, other, name="second", db=DB)

    plan = plan_json(second)
    s = run_json(second)

    assert (plan["reused"], plan["sent"], plan["credits"]) == (2, 1, 10)
    assert [e.content_sha256 for e in sandbox.ledger()[sent_before:]] == [_sha(GREY)]
    assert (s["reused"], s["credits"], s["credits_saved"]) == (2, 10, 20)
    paid_red = [k for k, r in export_rows(first).items()
                if r["content_hash"] == _sha(RED) and r["reused_from"] is None]
    r_jpg = export_rows(second)[str(other / "r.jpg")]
    assert r_jpg["reused_from"] == paid_red[0] and r_jpg["credits"] == 0
    st = status_json(second)
    assert st["reused"] == 2
    assert st["credits"]["recorded"] == 10 and st["credits"]["saved_by_reuse"] == 20
    assert status_json(first)["credits"]["recorded"] == 30  # the first job's figures are its own


@pytest.mark.parametrize("path,api", [
    ("collectibles/v2/sport_id", {}),
    (None, {"fields": {"lang": "de"}}),
], ids=["endpoint path", "fields"])
def test_another_request_sends_known_bytes_again(tmp_path, sandbox, folder, path, api):
    run_json(write_job(tmp_path, sandbox, folder, name="first", db=DB))
    assert len(sandbox.ledger()) == 3
    endpoint = sandbox.endpoint_url(path) if path else sandbox
    second = write_job(tmp_path, endpoint, folder, name="second", db=DB, api=api)

    assert plan_json(second)["credits"] == 30
    s = run_json(second)

    assert (s["sent"], s["reused"], s["credits"]) == (3, 2, 30)  # in-run copies are still reused
    assert Counter(e.content_sha256 for e in sandbox.ledger()[3:]) == Counter(
        {_sha(RED): 1, _sha(GREEN): 1, _sha(BLUE): 1})


def test_reuse_false_sends_every_copy_local_and_s3(tmp_path, sandbox, folder, s3_bucket):
    s3_bucket.put("x/red.jpg", RED)
    job = write_job(tmp_path, sandbox, [folder, s3_bucket.url("x/")], db=DB,
                    storage_options=s3_bucket.storage_options, credits={"reuse": False})

    plan = plan_json(job)
    s = run_json(job)

    assert Counter(e.content_sha256 for e in sandbox.ledger())[_sha(RED)] == 4
    assert len(sandbox.ledger()) == 6
    assert s["credits"] == plan["credits"] == 60 and s["reused"] == 0
    assert all(r["reused_from"] is None and r["credits"] == 10 for r in export_rows(job).values())


def test_plan_credits_are_what_the_run_charges(tmp_path, sandbox, folder, sample_data):
    run_json(write_job(tmp_path, sandbox, folder / "green.jpg", name="earlier", db=DB))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(4):  # new
        (mixed / f"new{i}.jpg").write_bytes(jpeg((i * 50, 100, 100)))
    shutil.copy(mixed / "new0.jpg", mixed / "dup-a.jpg")  # duplicates of new bytes
    shutil.copy(mixed / "new0.jpg", mixed / "dup-b.jpg")
    shutil.copy(mixed / "new1.jpg", mixed / "dup-c.jpg")
    shutil.copy(folder / "green.jpg", mixed / "known.jpg")  # answered by the other job
    for name in ("broken_truncated.jpg", "broken_text.jpg", "reject_avif.avif", "anim.gif"):
        shutil.copy(sample_data / name, mixed / name)
    shutil.copy(sample_data / "anim.gif", mixed / "anim-copy.gif")  # converted, then duplicate
    job = write_job(tmp_path, sandbox, mixed, name="mixed", db=DB)
    billed_before = sum(e.billed for e in sandbox.ledger())

    plan = plan_json(job)
    s = run_json(job)

    billed = sum(e.billed for e in sandbox.ledger()) - billed_before
    assert plan["credits"] == s["credits"] == billed * 10 == 50
    for key in ("sent", "reused", "rejected", "credits_saved", "new"):
        assert plan[key] == s[key], key
    assert plan["rejected_reasons"] == s["rejected_reasons"]
    assert status_json(job)["credits"]["recorded"] == plan["credits"]
    assert plan_json(job)["credits"] == 0


def test_an_unchanged_file_is_not_read_again(tmp_path, sandbox, folder):
    job = write_job(tmp_path, sandbox, folder, db=DB)
    run_json(job)
    sent = len(sandbox.ledger())
    # Same size and modification time, other bytes: garbage that would be rejected if it were
    # read. The fingerprint says "unchanged", so the rerun must not even open the file.
    target = folder / "green.jpg"
    st = target.stat()
    target.write_bytes(b"\0" * st.st_size)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    plan = plan_json(job)
    s = run_json(job)

    assert (plan["unchanged"], plan["rejected"], plan["credits"]) == (5, 0, 0)
    assert (s["unchanged"], s["rejected"], s["sent"]) == (5, 0, 0)
    assert len(sandbox.ledger()) == sent
    row = export_rows(job)[str(target)]
    assert row["state"] == "done" and row["result"]["_status"]["code"] == 200


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_answer_stays_reusable_after_the_image_that_paid_for_it_changed(tmp_path, sandbox,
                                                                           folder):
    job = write_job(tmp_path, sandbox, folder, db=DB)
    run_json(job)
    (folder / "red.jpg").write_bytes(GREY)  # the paid copy of the red bytes now holds others
    assert run_json(job)["credits"] == 10
    (folder / "late red.jpg").write_bytes(RED)  # the red bytes come back under a new name

    plan = plan_json(job)
    s = run_json(job)

    assert (plan["reused"], plan["credits"]) == (1, 0)
    assert (s["reused"], s["credits"]) == (1, 0)
    assert Counter(e.content_sha256 for e in sandbox.ledger())[_sha(RED)] == 1
    row = export_rows(job)[str(folder / "late red.jpg")]
    assert row["state"] == "done" and row["credits"] == 0
    other = export_rows(job)[str(folder / "red copy.jpg")]["result"]
    assert row["result"] == {**other, "_id": row["key"]}  # its own identity, the same analysis
