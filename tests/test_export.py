"""`ximrun export` for joining back to a catalog: the source URI and every manifest column as
columns of their own, `--field` values, filters, CSV cells a spreadsheet will not evaluate,
Parquet, and `-o` to a local file or an s3:// URL (the real moto server), never half-written."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from pathlib import Path

import pytest
from driver import bars_jpeg, export_rows, invoke, run_json, write_job

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

BEST = "_objects.0._identification.best_match.name"
FORMULAS = ["=1+2", "+SUM(A1)", "-3+4", "@cmd", "\tx", "\rx"]


def build_catalog(tmp: Path, n: int = 300) -> tuple[Path, dict[str, dict]]:
    """n SKUs over n // 3 photos (three SKUs per photo), every 25th photo missing, formula-like
    cells in the title column; returns the manifest and what each SKU's row says."""
    (tmp / "photos").mkdir()
    expected: dict[str, dict] = {}
    lines = ["sku,path,title,price"]
    for i in range(n):
        photo = i // 3
        name = f"photos/p{photo:04d}.jpg"
        if photo % 25 != 7 and not (tmp / name).exists():
            (tmp / name).write_bytes(bars_jpeg(photo))
        sku = f"SKU-{i:05d}"
        title = FORMULAS[i % len(FORMULAS)] + f" item {i}" if i % 10 == 0 else f"Item, {i}"
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow([sku, name, title, str(i)])
        lines.append(buf.getvalue())
        expected[sku] = {"title": title, "price": str(i), "photo": photo,
                         "missing": photo % 25 == 7}
    (tmp / "catalog.csv").write_text("\n".join(lines).replace("sku,path", "id,path", 1) + "\n",
                                     encoding="utf-8")
    return tmp / "catalog.csv", expected


@pytest.fixture
def imported(tmp_path, sandbox):
    _, expected = build_catalog(tmp_path)
    job = write_job(tmp_path, sandbox, manifest="catalog.csv")
    s = run_json(job, exit_code=1)  # the missing photos fail
    photos = 100
    missing = sum(1 for p in range(photos) if p % 25 == 7)
    assert s["sent"] == photos - missing and s["reused"] == 2 * (photos - missing)
    assert s["failed"] == 3 * missing
    return job, expected


def check_joined(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    """Every SKU of the catalog once, with its own columns, state and record."""
    assert set(rows) == set(expected)
    for sku, want in expected.items():
        row = rows[sku]
        assert row["title"] == want["title"] and row["price"] == want["price"], row
        assert row["uri"].endswith(f"p{want['photo']:04d}.jpg")
        if want["missing"]:
            assert row["state"] == "failed" and row["reason"].startswith("missing: ")
            assert row["best"] in (None, "")
        else:
            assert row["state"] == "done" and row["best"]
            record = row["result"] if isinstance(row["result"], dict) else json.loads(row["result"])
            assert record["_id"] == sku and record["title"] == want.get("raw", want["title"])


def test_jsonl_export_joins_back_by_sku(imported):
    job, expected = imported
    rows = export_rows(job, "--field", f"best={BEST}", "--field", "width=_width")
    check_joined(rows, expected)
    one = rows["SKU-00004"]
    assert list(one)[:6] == ["key", "uri", "title", "price", "state", "reason"]
    assert one["width"] == 32 and isinstance(one["credits"], int)
    # A photo shared by three SKUs: one paid, two reused, the same analysis under three ids.
    trio = [rows[f"SKU-{i:05d}"] for i in (3, 4, 5)]
    assert [r["credits"] for r in trio] == [10, 0, 0]
    assert [r["reused_from"] for r in trio] == [None, "SKU-00003", "SKU-00003"]
    assert len({r["best"] for r in trio}) == 1


def test_csv_export_neutralises_formulas_and_joins_back(imported, tmp_path):
    job, expected = imported
    out = tmp_path / "out" / "export.csv"
    out.parent.mkdir()
    res = invoke("export", str(job), "--format", "csv", "-o", str(out), "--field", f"best={BEST}")
    assert res.exit_code == 0, res.output
    with out.open(newline="", encoding="utf-8") as fh:
        rows = {r["key"]: r for r in csv.DictReader(fh)}
    # Spreadsheet-safe: every cell that starts like a formula carries a leading quote.
    neutral = {sku: dict(want, raw=want["title"],
                         title="'" + want["title"] if want["title"][0] in "=+-@\t\r"
                         else want["title"]) for sku, want in expected.items()}
    assert rows["SKU-00000"]["title"] == "'=1+2 item 0"
    check_joined(rows, neutral)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left

    # The join a catalog team would write: sqlite, by SKU.
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE catalog (id TEXT PRIMARY KEY, title TEXT)")
    db.executemany("INSERT INTO catalog VALUES (?, ?)", [(k, v["title"]) for k, v in expected.items()])
    db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, state TEXT, best TEXT)")
    db.executemany("INSERT INTO answers VALUES (?, ?, ?)",
                   [(r["key"], r["state"], r["best"]) for r in rows.values()])
    joined = db.execute("SELECT count(*), sum(a.state = 'done'), sum(a.best != '') FROM catalog c "
                        "JOIN answers a ON a.key = c.id").fetchone()
    assert joined == (300, 288, 288)


def test_parquet_export_locally_and_to_s3(imported, tmp_path, s3_bucket):
    job, expected = imported
    local = tmp_path / "export.parquet"
    res = invoke("export", str(job), "--format", "parquet", "-o", str(local),
                 "--field", f"best={BEST}")
    assert res.exit_code == 0, res.output
    table = pq.read_table(local)
    assert table.schema.field("credits").type == pa.int64()
    check_joined({r["key"]: r for r in table.to_pylist()}, expected)

    # The same to s3:// on the moto server, with the job's storage options.
    job_s3 = write_job(tmp_path, "sandbox", manifest="catalog.csv", storage_options=s3_bucket.storage_options)
    target = s3_bucket.url("exports/run-1.parquet")
    res = invoke("export", str(job_s3), "--format", "parquet", "-o", target, "--field", f"best={BEST}")
    assert res.exit_code == 0, res.output
    keys = [o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]]
    assert keys == ["exports/run-1.parquet"]  # the temporary object is gone
    with s3_bucket.fs.open(target, "rb") as fh:
        remote = pq.read_table(fh)
    check_joined({r["key"]: r for r in remote.to_pylist()}, expected)
    res = invoke("export", str(job_s3), "--format", "jsonl", "-o", s3_bucket.url("exports/all.jsonl"))
    assert res.exit_code == 0, res.output
    lines = s3_bucket.fs.cat(s3_bucket.url("exports/all.jsonl")).decode().splitlines()
    assert len(lines) == 300


def test_filters_by_state_run_and_time(tmp_path, sandbox):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(bars_jpeg(i))
    (tmp_path / "c.csv").write_text("id,path\nA,photos/0.jpg\nB,photos/1.jpg\n")
    job = write_job(tmp_path, sandbox, manifest="c.csv")
    first = run_json(job)["run_id"]
    stamp = max(r["answered_at"] for r in export_rows(job).values())
    (tmp_path / "c.csv").write_text("id,path\nA,photos/0.jpg\nB,photos/1.jpg\nC,photos/2.jpg\n"
                                    "D,photos/none.jpg\n")
    second = run_json(job, exit_code=1)["run_id"]
    assert set(export_rows(job, "--run", str(first))) == {"A", "B"}
    assert set(export_rows(job, "--run", str(second))) == {"C", "D"}
    assert set(export_rows(job, "--run", str(second), "--state", "done")) == {"C"}
    later = export_rows(job, "--since", stamp)
    assert "C" in later and "D" not in later  # D was never answered
    assert export_rows(job, "--since", "2999-01-01") == {}
    assert set(export_rows(job, "--since", "2000-01-01T00:00:00+02:00")) == {"A", "B", "C"}


@pytest.mark.parametrize("args, message", [
    (("--field", "best"), "expected NAME=PATH"),
    (("--field", "best=_objects..name"), "an empty step"),
    (("--field", "best="), "expected NAME=PATH"),
    (("--field", "state=_width"), "already has a column 'state'"),
    (("--since", "yesterday"), "not an ISO 8601"),
    (("-o", "no/such/folder/x.csv"), "no such folder"),
    (("--format", "parquet"), "give -o FILE"),
])
def test_usage_errors_exit_2_in_one_line(tmp_path, sandbox, args, message):
    (tmp_path / "a.jpg").write_bytes(bars_jpeg(1))
    job = write_job(tmp_path, sandbox, tmp_path / "a.jpg")
    run_json(job)
    res = invoke("export", str(job), *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_parquet_without_pyarrow_names_the_extra(tmp_path, sandbox, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(bars_jpeg(1))
    job = write_job(tmp_path, sandbox, tmp_path / "a.jpg")
    run_json(job)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    res = invoke("export", str(job), "--format", "parquet", "-o", str(tmp_path / "x.parquet"))
    assert res.exit_code == 2 and "ximrun[parquet]" in res.output
    assert not list(tmp_path.glob("x.parquet*"))


def test_a_manifest_column_named_like_an_export_column_is_prefixed(tmp_path, sandbox):
    (tmp_path / "a.jpg").write_bytes(bars_jpeg(1))
    (tmp_path / "c.csv").write_text("id,path,state,colour\nA,a.jpg,CA,red\n")
    job = write_job(tmp_path, sandbox, manifest="c.csv")
    run_json(job)
    row = export_rows(job)["A"]
    assert row["manifest.state"] == "CA" and row["state"] == "done" and row["colour"] == "red"
