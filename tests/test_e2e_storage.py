"""End to end: object storage, manifests and incremental runs, through the real CLI, against the
emulator over HTTP and moto's S3 server. Nothing is patched."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cli_driver import TOKEN, export, invoke, jpeg, plan_json, status
from PIL import Image

from runner.job import SandboxSettings
from runner.sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent






def write_job(tmp: Path, sb: Sandbox, source: str, *, bucket=None, api: str = "",
              extra: str = "", name: str = "s") -> Path:
    """A job file: `source` is the body of [source]; the bucket's options go in as-is."""
    options = ""
    if bucket is not None:
        options = "[source.storage_options]\n" + "\n".join(
            f"{k} = {json.dumps(v)}" for k, v in bucket.storage_options.items())
    job = tmp / f"{name}.toml"
    job.write_text(f'name = "{name}"\n[source]\n{source}\n{options}\n'
                   f'[api]\nendpoint = "{sb.endpoint_url()}"\nmax_retries = 2\n{api}\n'
                   f'[state]\ndb = "state/{name}.db"\n{extra}\n')
    return job


def run_json(job: Path, *args: str) -> tuple[int, dict]:
    res = invoke("run", str(job), "--json", *args)
    return res.exit_code, json.loads(res.stdout)








# --- S3 prefixes -------------------------------------------------------------------------------

def test_s3_prefix_with_nested_keys_spaces_and_unicode_ends_done(tmp_path, sandbox, s3_bucket):
    keys = [f"in/{sub}{i:02d} {word}.jpg"
            for i in range(30)
            for sub, word in [(("", "a/", "a/b c/")[i % 3], ("card", "kärtchen", "カード")[i % 3])]]
    s3_bucket.put_many({k: jpeg((i * 8, 255 - i * 8, 90)) for i, k in enumerate(keys)})
    s3_bucket.put("in/a/", b"")  # a folder marker is not an image
    s3_bucket.put("in/.hidden.jpg", jpeg((1, 2, 3)))
    s3_bucket.put("other/outside.jpg", jpeg((4, 5, 6)))
    job = write_job(tmp_path, sandbox, f'paths = ["{s3_bucket.url("in/")}"]', bucket=s3_bucket)

    code, s = run_json(job)

    assert code == 0, s
    assert (s["listed"], s["done"], s["credits"]) == (30, 30, 300)
    uris = {s3_bucket.url(k) for k in keys}
    assert {e.record_id for e in sandbox.ledger()} == uris
    rows = export(job)
    assert set(rows) == uris
    assert all(r["state"] == "done" and r["credits"] == 10 for r in rows.values())


def run_and_delete_after_first_answer(job: Path, sb: Sandbox,
                                      delete: Callable[[], None]) -> tuple[int, dict, str]:
    """Run the CLI in its own process, as under cron; once the API has answered its first request
    (so the listing is recorded), call delete(). Returns the exit code, the summary and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--json", "-q"],
                            cwd=REPO, env={**os.environ, "XIMILAR_TOKEN": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not sb.ledger() and proc.poll() is None:
            time.sleep(0.005)
        delete()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out, err
    return proc.returncode, json.loads(out), err


# One batch in flight at a time, each answered slowly: images at the end of the listing are read
# only several answers after the first one.
SLOW = SandboxSettings(token=TOKEN, latency_ms=250)
ONE_AT_A_TIME = "batch_size = 10\nconcurrency = 1"


def test_object_deleted_between_listing_and_reading_fails_and_the_run_goes_on(tmp_path,
                                                                               s3_bucket):
    s3_bucket.put_many({f"p/{i:03d}.jpg": jpeg((i * 4, 80, 250 - i * 4)) for i in range(60)})
    doomed = "p/059.jpg"
    with Sandbox(SLOW) as sb:
        job = write_job(tmp_path, sb, f'paths = ["{s3_bucket.url("p/")}"]', bucket=s3_bucket,
                        api=ONE_AT_A_TIME)
        code, s, err = run_and_delete_after_first_answer(
            job, sb, lambda: s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=doomed))
        assert s3_bucket.url(doomed) not in {e.record_id for e in sb.ledger()}
    assert code == 1, err
    assert (s["listed"], s["done"], s["failed"]) == (60, 59, 1)
    row = export(job)[s3_bucket.url(doomed)]
    assert row["state"] == "failed" and row["reason"].startswith("not_found:"), row
    assert row["credits"] == 0


def test_a_slow_api_does_not_make_the_run_read_the_whole_listing_ahead(tmp_path):
    # Images wait in memory for a batch only up to a window; the rest of the listing is read as
    # batches leave. Files deleted after the first answer are therefore never read, nor sent.
    d = tmp_path / "many"
    d.mkdir()
    for i in range(120):
        (d / f"{i:03d}.jpg").write_bytes(jpeg((i * 2, 250 - i * 2, 80)))
    late: list[str] = []

    def delete_the_last_listed() -> None:  # a folder lists in directory order, not by name
        with sqlite3.connect(tmp_path / "state" / "s.db", timeout=30) as db:
            late.extend(k for (k,) in db.execute("SELECT key FROM items ORDER BY rowid DESC "
                                                 "LIMIT 40"))
        for key in late:
            os.unlink(key)

    with Sandbox(SLOW) as sb:
        job = write_job(tmp_path, sb, f'paths = ["{d}"]', api=ONE_AT_A_TIME)
        code, s, err = run_and_delete_after_first_answer(job, sb, delete_the_last_listed)
        sent = {e.record_id for e in sb.ledger()}
    assert code == 1, err
    assert (s["done"], s["failed"]) == (80, 40)
    assert not sent & set(late)
    rows = export(job)
    assert all(rows[key]["reason"].startswith("not_found:") for key in late)


def test_incremental_s3_run_sends_only_the_overwritten_object_and_counts_the_removed(
        tmp_path, sandbox, s3_bucket):
    s3_bucket.put_many({f"n/{i}.jpg": jpeg((i * 40, 10, 10)) for i in range(5)})
    job = write_job(tmp_path, sandbox, f'paths = ["{s3_bucket.url("n/")}"]', bucket=s3_bucket)
    assert run_json(job)[0] == 0
    assert len(sandbox.ledger()) == 5

    s3_bucket.put("n/2.jpg", jpeg((1, 200, 1)))  # new bytes, new ETag
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="n/4.jpg")
    plan = plan_json(job)
    assert (plan["changed"], plan["unchanged"], plan["new"]) == (1, 3, 0)
    assert plan["credits"] == 10

    code, s = run_json(job)
    assert code == 0, s
    assert s["credits"] == 10 and s["missing"] == 1
    assert [e.record_id for e in sandbox.ledger()[5:]] == [s3_bucket.url("n/2.jpg")]
    st = status(job)
    assert st["missing"] == 1 and st["states"]["done"] == 5
    assert export(job)[s3_bucket.url("n/4.jpg")]["missing"] is True


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
    job = write_job(tmp_path, sandbox, 'manifest = "catalog.csv"', bucket=s3_bucket)

    res = invoke("run", str(job))

    assert res.exit_code == 0, res.output
    assert "catalog.csv:4:" in res.output  # the skipped row is named by its line
    assert "skipped 1 manifest row" in res.output
    assert sorted(e.record_id for e in sandbox.ledger()) == ["card-1", "card-2", "card-3"]
    rows = export(job)
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
    job = write_job(tmp_path, sandbox, 'manifest = "catalog.jsonl"', bucket=s3_bucket)

    code, s = run_json(job)

    assert code == 0, s
    assert s["skipped_rows"] == 1 and s["done"] == 2
    assert sorted(e.record_id for e in sandbox.ledger()) == ["a", "b"]
    rows = export(job)
    assert rows["a"]["result"]["tags"] == ["holo", "1st"]
    assert rows["b"]["result"]["sku"] == "B-1"


def test_manifest_with_duplicate_ids_exits_2_before_anything_is_sent(tmp_path, sandbox):
    (tmp_path / "a.jpg").write_bytes(jpeg((10, 20, 30)))
    (tmp_path / "b.jpg").write_bytes(jpeg((30, 20, 10)))
    (tmp_path / "dups.csv").write_text("id,path\nx,a.jpg\ny,b.jpg\nx,b.jpg\n")
    job = write_job(tmp_path, sandbox, 'manifest = "dups.csv"')

    res = invoke("run", str(job))

    assert res.exit_code == 2, res.output
    assert "duplicate id 'x' on lines 2 and 4" in res.output
    assert sandbox.ledger() == []
    assert invoke("plan", str(job)).exit_code == 2
    st = status(job)  # the refused run is not left "running"
    assert [(r["status"], r["exit_code"]) for r in st["runs"]] == [("source_refused", 2)]
    assert st["states"]["pending"] == 0


# --- what is sent ------------------------------------------------------------------------------

def test_send_url_passes_presigned_s3_urls_that_the_api_fetches(tmp_path, sandbox, s3_bucket):
    s3_bucket.put_many({f"u/{i}.jpg": jpeg((i * 60, 60, 60)) for i in range(3)})
    job = write_job(tmp_path, sandbox, f'paths = ["{s3_bucket.url("u/")}"]', bucket=s3_bucket,
                    extra='[images]\nsend = "url"')

    code, s = run_json(job)

    assert code == 0, s
    ledger = sandbox.ledger()
    assert len(ledger) == 3
    for e in ledger:
        assert e.url is not None and e.url.startswith(s3_bucket.endpoint_url)
        assert "Signature" in e.url and e.content_sha256 is None and e.code == 200
    assert all(r["state"] == "done" for r in export(job).values())


def test_max_side_downscales_before_upload(tmp_path, sandbox):
    d = tmp_path / "big"
    d.mkdir()
    (d / "wide.jpg").write_bytes(jpeg((50, 90, 130), size=(400, 300)))
    (d / "tall.png").write_bytes(_png((90, 50, 130), size=(120, 480)))
    (d / "small.jpg").write_bytes(jpeg((130, 90, 50), size=(60, 40)))
    job = write_job(tmp_path, sandbox, f'paths = ["{d}"]', extra="[images]\nmax_side = 100")

    assert run_json(job)[0] == 0

    sizes = {Path(k).name: (r["result"]["_width"], r["result"]["_height"])
             for k, r in export(job).items()}
    assert sizes == {"wide.jpg": (100, 75), "tall.png": (25, 100), "small.jpg": (60, 40)}


def test_transcode_sends_jpeg_for_the_rejected_sample_formats(tmp_path, sandbox, sample_data):
    job = write_job(tmp_path, sandbox, f'paths = ["{sample_data}/reject_*"]',
                    extra='[images]\ntranscode = ["avif", "jp2", "psd", "heif"]')

    res = invoke("run", str(job))

    assert res.exit_code == 0, res.output
    states = {Path(k).name: (r["state"], r["reason"]) for k, r in export(job).items()}
    assert states == {
        "reject_avif.avif": ("done", None), "reject_jp2.jp2": ("done", None),
        "reject_psd.psd": ("done", None), "reject_heif.heif": ("done", None),
        "reject_svg.svg": ("rejected", "unsupported_format:svg"),
        "reject_pdf.pdf": ("rejected", "unsupported_format:pdf"),
    }
    assert len(sandbox.ledger()) == 4 and all(e.code == 200 for e in sandbox.ledger())


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()
