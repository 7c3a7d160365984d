"""End to end: object storage, manifests and incremental runs, through the real CLI, against the
emulator over HTTP and moto's S3 server. Nothing is patched."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from driver import (
    TOKEN,
    export_rows,
    invoke,
    jpeg,
    plan_json,
    png,
    run_json,
    start,
    status_json,
    wait_for,
    write_job,
)

from runner.job import SandboxSettings
from runner.sandbox import Sandbox

# --- S3 prefixes -------------------------------------------------------------------------------

def test_s3_prefix_with_nested_keys_spaces_and_unicode_ends_done(tmp_path, sandbox, s3_bucket):
    keys = [f"in/{sub}{i:02d} {word}.jpg"
            for i in range(30)
            for sub, word in [(("", "a/", "a/b c/")[i % 3], ("card", "kärtchen", "カード")[i % 3])]]
    s3_bucket.put_many({k: jpeg((i * 8, 255 - i * 8, 90)) for i, k in enumerate(keys)})
    s3_bucket.put("in/a/", b"")  # a folder marker is not an image
    s3_bucket.put("in/.hidden.jpg", jpeg((1, 2, 3)))
    s3_bucket.put("other/outside.jpg", jpeg((4, 5, 6)))
    job = write_job(tmp_path, sandbox, s3_bucket.url("in/"),
                    storage_options=s3_bucket.storage_options)

    s = run_json(job)

    assert (s["listed"], s["done"], s["credits"]) == (30, 30, 300)
    uris = {s3_bucket.url(k) for k in keys}
    assert {e.record_id for e in sandbox.ledger()} == uris
    rows = export_rows(job)
    assert set(rows) == uris
    assert all(r["state"] == "done" and r["credits"] == 10 for r in rows.values())


def run_and_delete_after_first_answer(tmp: Path, job: Path, sb: Sandbox,
                                      delete: Callable[[], None]) -> tuple[int, dict, str]:
    """Run the CLI in its own process, as under cron; once the API has answered its first request
    (so the listing is recorded), call delete(). Returns the exit code, the summary and stderr."""
    child = start(tmp, "run", str(job), "--json", "-q")
    wait_for(lambda: sb.ledger(), "the first request to reach the API", child, interval=0.005)
    delete()
    code = child.wait()
    assert child.stdout, child.stderr
    return code, json.loads(child.stdout), child.stderr


# One batch in flight at a time, each answered slowly: images at the end of the listing are read
# only several answers after the first one.
SLOW = SandboxSettings(token=TOKEN, latency_ms=250)
ONE_AT_A_TIME = {"batch_size": 10, "concurrency": 1}


@pytest.mark.slow
def test_object_deleted_between_listing_and_reading_fails_and_the_run_goes_on(tmp_path,
                                                                               s3_bucket):
    s3_bucket.put_many({f"p/{i:03d}.jpg": jpeg((i * 4, 80, 250 - i * 4)) for i in range(60)})
    doomed = "p/059.jpg"
    with Sandbox(SLOW) as sb:
        job = write_job(tmp_path, sb, s3_bucket.url("p/"),
                        storage_options=s3_bucket.storage_options, api=ONE_AT_A_TIME)
        code, s, err = run_and_delete_after_first_answer(
            tmp_path, job, sb, lambda: s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=doomed))
        assert s3_bucket.url(doomed) not in {e.record_id for e in sb.ledger()}
    assert code == 1, err
    assert (s["listed"], s["done"], s["failed"]) == (60, 59, 1)
    row = export_rows(job)[s3_bucket.url(doomed)]
    assert row["state"] == "failed" and row["reason"].startswith("not_found:"), row
    assert row["credits"] == 0


@pytest.mark.slow
def test_a_slow_api_does_not_make_the_run_read_the_whole_listing_ahead(tmp_path):
    # Images wait in memory for a batch only up to a window; the rest of the listing is read as
    # batches leave. Files deleted after the first answer are therefore never read, nor sent.
    d = tmp_path / "many"
    d.mkdir()
    for i in range(120):
        (d / f"{i:03d}.jpg").write_bytes(jpeg((i * 2, 250 - i * 2, 80)))
    late: list[str] = []

    def delete_the_last_listed() -> None:  # a folder lists in directory order, not by name
        with sqlite3.connect(tmp_path / "state" / "t.db", timeout=30) as db:
            late.extend(k for (k,) in db.execute("SELECT key FROM items ORDER BY rowid DESC "
                                                 "LIMIT 40"))
        for key in late:
            os.unlink(key)

    with Sandbox(SLOW) as sb:
        job = write_job(tmp_path, sb, d, api=ONE_AT_A_TIME)
        code, s, err = run_and_delete_after_first_answer(tmp_path, job, sb,
                                                         delete_the_last_listed)
        sent = {e.record_id for e in sb.ledger()}
    assert code == 1, err
    assert (s["done"], s["failed"]) == (80, 40)
    assert not sent & set(late)
    rows = export_rows(job)
    assert all(rows[key]["reason"].startswith("not_found:") for key in late)


def test_incremental_s3_run_sends_only_the_overwritten_object_and_counts_the_removed(
        tmp_path, sandbox, s3_bucket):
    s3_bucket.put_many({f"n/{i}.jpg": jpeg((i * 40, 10, 10)) for i in range(5)})
    job = write_job(tmp_path, sandbox, s3_bucket.url("n/"),
                    storage_options=s3_bucket.storage_options)
    run_json(job)
    assert len(sandbox.ledger()) == 5

    s3_bucket.put("n/2.jpg", jpeg((1, 200, 1)))  # new bytes, new ETag
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="n/4.jpg")
    plan = plan_json(job)
    assert (plan["changed"], plan["unchanged"], plan["new"]) == (1, 3, 0)
    assert plan["credits"] == 10

    s = run_json(job)
    assert s["credits"] == 10 and s["missing"] == 1
    assert [e.record_id for e in sandbox.ledger()[5:]] == [s3_bucket.url("n/2.jpg")]
    st = status_json(job)
    assert st["missing"] == 1 and st["states"]["done"] == 5
    assert export_rows(job)[s3_bucket.url("n/4.jpg")]["missing"] is True


# --- manifests ---------------------------------------------------------------------------------

def test_csv_manifest_sends_ids_and_extra_columns_and_skips_a_malformed_row(tmp_path, sandbox,
                                                                           s3_bucket):
    s3_bucket.put("m/one.jpg", jpeg((200, 0, 0)))
    s3_bucket.put("m/two.jpg", jpeg((0, 200, 0)))
    (tmp_path / "local.jpg").write_bytes(jpeg((0, 0, 200)))
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("id,path,sku,title\n"
                        f"card-1,{s3_bucket.url('m/one.jpg')},SKU-1,Charizard\n"
                        f"card-2,{s3_bucket.url('m/two.jpg')},SKU-2,\"Pika, chu\"\n"
                        "card-x,local.jpg,SKU-X,too,many,values\n"
                        "card-3,local.jpg,SKU-3,Mew\n")
    job = write_job(tmp_path, sandbox, manifest="catalog.csv",
                    storage_options=s3_bucket.storage_options)

    res = invoke("run", str(job))

    assert res.exit_code == 0, res.output
    assert "catalog.csv:4:" in res.output  # the skipped row is named by its line
    assert "manifest rows skipped: 1, first at catalog.csv:4: 6 values" in res.output
    assert sorted(e.record_id for e in sandbox.ledger()) == ["card-1", "card-2", "card-3"]
    rows = export_rows(job)
    assert set(rows) == {"card-1", "card-2", "card-3"}
    assert rows["card-2"]["result"]["sku"] == "SKU-2"
    assert rows["card-2"]["result"]["title"] == "Pika, chu"
    assert rows["card-3"]["result"]["title"] == "Mew"
    assert all(r["state"] == "done" for r in rows.values())


def test_jsonl_manifest_sends_ids_and_extra_fields_and_skips_a_malformed_line(tmp_path, sandbox,
                                                                             s3_bucket):
    s3_bucket.put("j/a.jpg", jpeg((120, 0, 0)))
    (tmp_path / "b.jpg").write_bytes(jpeg((0, 120, 0)))
    lines = [json.dumps({"id": "a", "path": s3_bucket.url("j/a.jpg"), "sku": "A-1",
                         "tags": ["holo", "1st"]}),
             '{"id": "broken", "path": ',
             json.dumps({"id": "b", "path": "b.jpg", "sku": "B-1"})]
    (tmp_path / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    job = write_job(tmp_path, sandbox, manifest="catalog.jsonl",
                    storage_options=s3_bucket.storage_options)

    s = run_json(job)

    assert s["skipped_rows"] == 1 and s["done"] == 2
    assert sorted(e.record_id for e in sandbox.ledger()) == ["a", "b"]
    rows = export_rows(job)
    assert rows["a"]["result"]["tags"] == ["holo", "1st"]
    assert rows["b"]["result"]["sku"] == "B-1"


def test_manifest_with_duplicate_ids_exits_2_before_anything_is_sent(tmp_path, sandbox):
    (tmp_path / "a.jpg").write_bytes(jpeg((10, 20, 30)))
    (tmp_path / "b.jpg").write_bytes(jpeg((30, 20, 10)))
    (tmp_path / "dups.csv").write_text("id,path\nx,a.jpg\ny,b.jpg\nx,b.jpg\n")
    job = write_job(tmp_path, sandbox, manifest="dups.csv")

    res = invoke("run", str(job))

    assert res.exit_code == 2, res.output
    assert "duplicate id 'x' on lines 2 and 4" in res.output
    assert sandbox.ledger() == []
    assert invoke("plan", str(job)).exit_code == 2
    st = status_json(job)  # the refused run is not left "running"
    assert [(r["status"], r["exit_code"]) for r in st["runs"]] == [("source_refused", 2)]
    assert st["states"]["pending"] == 0


# --- what is sent ------------------------------------------------------------------------------

def test_send_url_passes_presigned_s3_urls_that_the_api_fetches(tmp_path, sandbox, s3_bucket):
    s3_bucket.put_many({f"u/{i}.jpg": jpeg((i * 60, 60, 60)) for i in range(3)})
    job = write_job(tmp_path, sandbox, s3_bucket.url("u/"),
                    storage_options=s3_bucket.storage_options, images={"send": "url"})

    run_json(job)

    ledger = sandbox.ledger()
    assert len(ledger) == 3
    for e in ledger:
        assert e.url is not None and e.url.startswith(s3_bucket.endpoint_url)
        assert "Signature" in e.url and e.content_sha256 is None and e.code == 200
    assert all(r["state"] == "done" for r in export_rows(job).values())


def test_max_side_downscales_before_upload(tmp_path, sandbox):
    d = tmp_path / "big"
    d.mkdir()
    (d / "wide.jpg").write_bytes(jpeg((50, 90, 130), size=(400, 300)))
    (d / "tall.png").write_bytes(png((90, 50, 130), size=(120, 480)))
    (d / "small.jpg").write_bytes(jpeg((130, 90, 50), size=(60, 40)))
    job = write_job(tmp_path, sandbox, d, images={"max_side": 100})

    run_json(job)

    sizes = {Path(k).name: (r["result"]["_width"], r["result"]["_height"])
             for k, r in export_rows(job).items()}
    assert sizes == {"wide.jpg": (100, 75), "tall.png": (25, 100), "small.jpg": (60, 40)}


def test_transcode_sends_jpeg_for_the_rejected_sample_formats(tmp_path, sandbox, sample_data):
    job = write_job(tmp_path, sandbox, f"{sample_data}/reject_*",
                    images={"transcode": ["avif", "jp2", "psd", "heif"]})

    res = invoke("run", str(job))

    assert res.exit_code == 0, res.output
    states = {Path(k).name: (r["state"], r["reason"]) for k, r in export_rows(job).items()}
    assert states == {
        "reject_avif.avif": ("done", None), "reject_jp2.jp2": ("done", None),
        "reject_psd.psd": ("done", None), "reject_heif.heif": ("done", None),
        "reject_svg.svg": ("rejected", "unsupported_format:svg"),
        "reject_pdf.pdf": ("rejected", "unsupported_format:pdf"),
    }
    assert len(sandbox.ledger()) == 4 and all(e.code == 200 for e in sandbox.ledger())
