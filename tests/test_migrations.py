"""The state database's migrations: a database written by ximrun 0.1 (schema version 1, the
committed fixture tests/data/v1-catalog.db, made by that version's CLI on a catalog where two SKUs
share a photo) opens, is upgraded and keeps every answer; one from a newer ximrun is refused,
untouched (exit 74); status and export never migrate."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from driver import invoke, jpeg, run_json, sends, write_job

from runner import schema
from runner.errors import DatabaseError, ExitCode
from runner.store import Store

FIXTURE = Path(__file__).parent / "data" / "v1-catalog.db"
RED, BLUE = jpeg((200, 20, 20)), jpeg((20, 20, 200))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(db: Path) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["key"]: dict(r) for r in conn.execute("SELECT * FROM items")}
    finally:
        conn.close()


def meta(db: Path) -> tuple[str, list[tuple]]:
    conn = sqlite3.connect(db)
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        steps = conn.execute("SELECT version, name FROM _migrations ORDER BY version").fetchall()
        return version, steps
    finally:
        conn.close()


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """The catalog the fixture was made from, and the fixture as the job's database."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "red.jpg").write_bytes(RED)
    (tmp_path / "photos" / "blue.jpg").write_bytes(BLUE)
    (tmp_path / "catalog.csv").write_text(
        "id,path,brand,price\nSKU-1,photos/red.jpg,Acme,10\nSKU-2,photos/red.jpg,Other,12\n"
        "SKU-3,photos/blue.jpg,Acme,7\n", encoding="utf-8")
    shutil.copy(FIXTURE, tmp_path / "v1.db")
    return tmp_path


def test_the_fixture_is_a_version_1_database_with_the_wrong_reused_identity():
    before = rows(FIXTURE)
    assert json.loads(before["SKU-2"]["result"])["_id"] == "SKU-1"  # the bug it was made with
    conn = sqlite3.connect(FIXTURE)
    try:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == "1"
    finally:
        conn.close()


def test_a_version_1_database_is_upgraded_in_place_keeping_every_answer(v1):
    db = v1 / "v1.db"
    before = rows(db)
    with Store(db) as store:
        assert store.version == schema.SCHEMA_VERSION == 3
    after = rows(db)
    assert set(after) == set(before)
    version, steps = meta(db)
    assert version == "3" and [v for v, _ in steps] == [1, 2, 3]
    for key in ("SKU-1", "SKU-3"):  # paid answers are kept byte for byte
        assert after[key]["result"] == before[key]["result"]
        assert after[key]["credits"] == before[key]["credits"] == 10
    fixed, paid = json.loads(after["SKU-2"]["result"]), json.loads(before["SKU-1"]["result"])
    # Its own identity; the paying row's manifest cells (brand, price) are gone; the analysis
    # (every other key, dominant_colors too, which is no cell: a list) is kept.
    assert fixed["_id"] == "SKU-2" and "brand" not in fixed and "price" not in fixed
    assert fixed == {k: v for k, v in paid.items() if k not in ("brand", "price")} | {"_id": "SKU-2"}
    assert after["SKU-2"]["reused_from"] == "SKU-1" and after["SKU-2"]["state"] == "done"
    with Store(db) as store:  # opening again changes nothing
        assert store.version == 3
    assert rows(db) == after
    conn = sqlite3.connect(db)  # step 3: the runs' account_gap, unknown for the old runs
    try:
        assert {r[0] for r in conn.execute("SELECT account_gap FROM runs")} == {None}
        views = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
        assert {"answers", "failures_by_reason", "credits_per_run"} <= views
    finally:
        conn.close()


def test_run_upgrades_a_version_1_database_and_pays_nothing_again(v1):
    # The fixture's answers were made by the embedded emulator: the same request signature.
    job = write_job(v1, "sandbox", manifest="catalog.csv", db="v1.db", name="cat")
    s = run_json(job)
    # Every photo's answer was already paid: relisted (another folder, other mtimes), reused.
    assert (s["sent"], s["requests"], s["credits"], s["reused"]) == (0, 0, 0, 3)
    out = json.loads(invoke("export", str(job), "--format", "jsonl").output.splitlines()[1])
    assert out["key"] == "SKU-2" and out["result"]["_id"] == "SKU-2"
    assert out["result"]["brand"] == "Other"  # relisted: its own manifest cells
    assert (out["brand"], out["price"]) == ("Other", "12")  # and as export columns


def test_status_and_export_refuse_a_version_1_database_without_changing_it(v1):
    job = write_job(v1, "sandbox", manifest="catalog.csv", db="v1.db", name="cat")
    db = v1 / "v1.db"
    before = digest(db)
    for command in ("status", "export"):
        res = invoke(command, str(job))
        assert res.exit_code == ExitCode.DATABASE == 74, res.output
        assert "ximrun run" in res.output and "schema version 1" in res.output
    assert digest(db) == before and not (v1 / "v1.db-wal").exists()


def test_a_database_from_a_newer_ximrun_is_refused_untouched(v1, sandbox):
    db = v1 / "v1.db"
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = digest(db)
    job = write_job(v1, sandbox, manifest="catalog.csv", db="v1.db", name="cat")
    for command in ("run", "status", "export", "plan"):
        res = invoke(command, str(job))
        assert res.exit_code == 74, (command, res.output)
        assert "newer ximrun" in res.output and "99" in res.output
    assert digest(db) == before
    assert sends(sandbox) == {}
    with pytest.raises(DatabaseError):
        Store(db)


def test_a_file_that_is_not_a_database_is_refused_with_74(tmp_path, sandbox):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "t.db").write_bytes(b"this is not a database" * 100)
    job = write_job(tmp_path, sandbox, tmp_path / "state")
    res = invoke("run", str(job))
    assert res.exit_code == 74 and "not a ximrun state database" in res.output


def test_a_new_database_records_every_step(tmp_path):
    with Store(tmp_path / "new.db"):
        pass
    version, steps = meta(tmp_path / "new.db")
    assert version == str(schema.SCHEMA_VERSION)
    assert [v for v, _ in steps] == [v for v, _, _ in schema.MIGRATIONS]


def test_a_failing_step_leaves_the_database_at_the_previous_version(tmp_path, monkeypatch):
    db = tmp_path / "s.db"
    with Store(db):
        pass

    def broken(c: sqlite3.Connection) -> None:
        c.execute("ALTER TABLE items ADD COLUMN half_done TEXT")
        raise RuntimeError("the next step fails half way")

    last = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, (last + 1, "broken", broken)])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", last + 1)
    with pytest.raises(RuntimeError):
        Store(db)
    assert meta(db)[0] == str(last)
    conn = sqlite3.connect(db)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(items)")]
    conn.close()
    assert "half_done" not in cols
