"""Catalog imports: a manifest of product photos whose `id` is the SKU, answered through the real
CLI against the emulator, then exported and joined back by SKU."""

from __future__ import annotations

import json
from pathlib import Path

from driver import export_rows, invoke, jpeg, run_json, sends, status_json, write_job

RED, GREEN, BLUE = jpeg((200, 20, 20)), jpeg((20, 200, 20)), jpeg((20, 20, 200))


def catalog(tmp: Path, rows: list[str], name: str = "catalog.csv",
            header: str = "id,path,brand,price") -> str:
    (tmp / name).write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return name


def photos(tmp: Path, **files: bytes) -> None:
    (tmp / "photos").mkdir(exist_ok=True)
    for name, data in files.items():
        (tmp / "photos" / f"{name}.jpg").write_bytes(data)


def analysis(record: dict, *sent: str) -> dict:
    """What the service computed: the record without what was sent with it."""
    return {k: v for k, v in record.items() if k not in {"_id", *sent}}


def test_a_reused_answer_carries_its_own_sku_and_manifest_columns(tmp_path, sandbox):
    photos(tmp_path, red=RED, blue=BLUE)
    manifest = catalog(tmp_path, ["SKU-1,photos/red.jpg,Acme,10", "SKU-2,photos/red.jpg,Other,12",
                                  "SKU-3,photos/blue.jpg,Acme,7", "SKU-4,photos/red.jpg,,"])
    job = write_job(tmp_path, sandbox, manifest=manifest, api={"batch_size": 10})
    s = run_json(job)
    assert (s["sent"], s["reused"], s["credits"]) == (2, 2, 20)
    assert sends(sandbox) == {"SKU-1": 1, "SKU-3": 1}

    rows = export_rows(job)
    paid = rows["SKU-1"]["result"]
    assert paid["_id"] == "SKU-1" and paid["brand"] == "Acme"
    for sku, brand, price in (("SKU-2", "Other", "12"), ("SKU-4", "", "")):
        row = rows[sku]
        assert row["reused_from"] == "SKU-1" and row["credits"] == 0
        assert row["result"]["_id"] == sku
        assert (row["result"]["brand"], row["result"]["price"]) == (brand, price)
        assert analysis(row["result"], "brand", "price") == analysis(paid, "brand", "price")


def test_reuse_across_runs_and_jobs_gets_its_own_identity(tmp_path, sandbox):
    photos(tmp_path, red=RED)
    first = write_job(tmp_path, sandbox, manifest=catalog(tmp_path, ["SKU-1,photos/red.jpg,Acme,10"]),
                      db="shared.db", name="first")
    run_json(first)
    # Another job on the same database, with other columns: the paying row's are not copied.
    other = catalog(tmp_path, ["B-7,photos/red.jpg,blue"], name="other.csv", header="id,path,colour")
    second = write_job(tmp_path, sandbox, manifest=other, db="shared.db", name="second")
    s = run_json(second)
    assert (s["sent"], s["reused"]) == (0, 1)
    row = export_rows(second)["B-7"]
    assert row["reused_from"] == "SKU-1"
    assert row["result"]["_id"] == "B-7" and row["result"]["colour"] == "blue"
    assert "brand" not in row["result"] and "price" not in row["result"]
    paid = export_rows(first)["SKU-1"]["result"]
    assert analysis(row["result"], "colour") == analysis(paid, "brand", "price")
    assert sends(sandbox) == {"SKU-1": 1}


def test_a_jsonl_catalog_keeps_typed_columns_in_reused_records(tmp_path, sandbox):
    photos(tmp_path, green=GREEN)
    lines = [{"id": "A", "path": "photos/green.jpg", "tags": ["x"], "n": 1},
             {"id": "B", "path": "photos/green.jpg", "tags": ["y", "z"], "n": 2}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    job = write_job(tmp_path, sandbox, manifest="c.jsonl")
    run_json(job)
    rows = export_rows(job)
    assert rows["B"]["result"]["tags"] == ["y", "z"] and rows["B"]["result"]["n"] == 2
    assert rows["B"]["result"]["_id"] == "B" and rows["B"]["reused_from"] == "A"


def test_every_row_with_an_id_or_path_gets_a_row_and_missing_photos_fail(tmp_path, sandbox):
    photos(tmp_path, red=RED)
    manifest = catalog(tmp_path, [
        "SKU-1,photos/red.jpg,Acme,10",       # 2
        "SKU-2,photos/gone.jpg,Acme,11",      # 3: the photo is not there
        ",photos/also-gone.jpg,NoId,1",       # 4: no id, a path that is not there
        "SKU-4,,Acme,12",                     # 5: an id, no path
        ",,nobody,0",                         # 6: neither: no row can be made
        "SKU-6,photos,Acme,13",               # 7: a folder
        ",,nobody,1",                         # 8: neither
    ])
    job = write_job(tmp_path, sandbox, manifest=manifest)
    plan = invoke("plan", str(job))
    assert "unreadable 4" in plan.output and "would send 1" in plan.output, plan.output
    assert "manifest rows skipped: 2, first at catalog.csv:6" in plan.output
    res = invoke("run", str(job))
    assert res.exit_code == 1, res.output
    assert "manifest rows skipped: 2, first at catalog.csv:6: no id and no path" in res.output
    assert sends(sandbox) == {"SKU-1": 1}

    failed = export_rows(job, "--state", "failed")
    gone = str(tmp_path / "photos" / "also-gone.jpg")
    assert {k: r["reason"] for k, r in failed.items()} == {
        "SKU-2": f"missing: {tmp_path / 'photos' / 'gone.jpg'}",
        gone: f"missing: {gone}",
        "SKU-4": "missing: no path or url value",
        "SKU-6": f"not_a_file: {tmp_path / 'photos'}",
    }
    st = status_json(job)
    assert st["states"]["failed"] == 4 and st["states"]["done"] == 1
    assert st["manifest_rows_skipped"] == {
        "count": 2, "first": "catalog.csv:6: no id and no path or url value"}
    assert "manifest rows skipped by the last run: 2" in invoke("status", str(job)).output

    # Nothing changed: the failures are kept (exit 1 again), nothing is sent.
    again = run_json(job, exit_code=1)
    assert again["kept_failed"] == 4 and again["sent"] == 0
    # The photo arrives: only it is sent.
    (tmp_path / "photos" / "gone.jpg").write_bytes(GREEN)
    third = run_json(job, exit_code=1)
    assert third["changed"] == 1 and third["sent"] == 1
    assert export_rows(job)["SKU-2"]["state"] == "done"


def test_a_done_photo_that_disappears_keeps_its_answer(tmp_path, sandbox):
    photos(tmp_path, red=RED)
    job = write_job(tmp_path, sandbox, manifest=catalog(tmp_path, ["SKU-1,photos/red.jpg,A,1"]))
    run_json(job)
    (tmp_path / "photos" / "red.jpg").unlink()
    s = run_json(job)
    assert s["unchanged"] == 1 and s["sent"] == 0
    assert export_rows(job)["SKU-1"]["state"] == "done"


def test_edited_manifest_columns_reach_the_export_without_a_resend(tmp_path, sandbox):
    photos(tmp_path, red=RED, blue=BLUE)
    job = write_job(tmp_path, sandbox, manifest=catalog(tmp_path, [
        "SKU-1,photos/red.jpg,Acme,10", "SKU-2,photos/blue.jpg,Acme,7"]))
    run_json(job)
    catalog(tmp_path, ["SKU-1,photos/red.jpg,Acme,11", "SKU-2,photos/blue.jpg,Acme,7"])
    s = run_json(job)
    assert (s["unchanged"], s["sent"]) == (2, 0)
    rows = export_rows(job)
    assert rows["SKU-1"]["price"] == "11" and rows["SKU-2"]["price"] == "7"
    assert rows["SKU-1"]["result"]["price"] == "10"  # the record is what was sent and paid
    assert sends(sandbox) == {"SKU-1": 1, "SKU-2": 1}
