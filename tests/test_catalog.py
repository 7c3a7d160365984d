"""Catalog imports: a manifest of product photos whose `id` is the SKU, answered through the real
CLI against the emulator, then exported and joined back by SKU."""

from __future__ import annotations

import json
from pathlib import Path

from driver import export_rows, jpeg, run_json, sends, write_job

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
