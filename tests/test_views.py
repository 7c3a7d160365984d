"""The state database's views (runner/schema.py create_views) and the README's sqlite-utils
recipes, run as they are written on a database made by a real run."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from driver import REPO, TOKEN, invoke, jpeg, run_json, write_job

from runner.job import SandboxSettings
from runner.sandbox import Sandbox
from runner.schema import VIEWS, create_schema


@pytest.fixture
def demo(tmp_path: Path, sample_data: Path) -> Path:
    """A job named demo whose database is state/demo.db below tmp_path, as the README's recipes
    expect: the sample data, two images gone since (not_found), and images the API refuses."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sample_data.iterdir():
        if p.suffix != ".md":
            (imgs / p.name).write_bytes(p.read_bytes())
    for i in range(6):
        (imgs / f"extra{i}.jpg").write_bytes(jpeg((30 * i, 60, 90), (80, 60)))
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=0.4, seed=5)) as sb:
        job = write_job(tmp_path, sb, imgs, name="demo")
        run_json(job, exit_code=1)
        run_json(job, exit_code=1)
    return job


def q(db: Path, sql: str, *args) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_the_views_answer_the_common_questions(tmp_path, demo):
    db = tmp_path / "state" / "demo.db"
    rows = {r["key"]: r for r in map(json.loads, invoke("export", str(demo)).stdout.splitlines())}
    done = {k: r for k, r in rows.items() if r["state"] == "done"}
    answers = {r["key"]: r for r in q(db, "SELECT * FROM answers WHERE job = 'demo'")}
    assert answers.keys() == done.keys()
    for key, r in done.items():
        a = answers[key]
        rec = r["result"]
        assert (a["width"], a["height"]) == (rec["_width"], rec["_height"])
        assert a["best_match"] == rec["_objects"][0]["_identification"]["best_match"]["name"]
        assert json.loads(a["bound_box"]) == rec["_objects"][0]["bound_box"]
        assert a["objects"] == len(rec["_objects"])
        assert a["reused"] == (r["reused_from"] is not None)
        assert json.loads(a["result"]) == rec

    by_reason = {(r["state"], r["reason"]): r["images"]
                 for r in q(db, "SELECT * FROM failures_by_reason WHERE job = 'demo'")}
    failed = [r for r in rows.values() if r["state"] == "failed"]
    rejected = [r for r in rows.values() if r["state"] == "rejected"]
    assert failed and sum(n for (s, _), n in by_reason.items() if s == "failed") == len(failed)
    assert sum(n for (s, _), n in by_reason.items() if s == "rejected") == len(rejected)
    assert by_reason[("rejected", "truncated")] == 1

    runs = q(db, "SELECT * FROM credits_per_run WHERE job = 'demo' ORDER BY run")
    assert [r["run"] for r in runs] == [1, 2]
    assert runs[-1]["credits_to_date"] == sum(r["credits"] for r in runs) == sum(
        r["credits"] for r in rows.values())
    assert all(r["seconds"] is not None and r["seconds"] >= 0 for r in runs)
    assert q(db, "SELECT count(*) FROM unanswered_requests")[0][0] == 0


def test_a_file_gone_groups_as_not_found_and_open_requests_are_listed(tmp_path):
    db = tmp_path / "x.db"
    conn = sqlite3.connect(db)
    create_schema(conn)
    create_schema(conn)  # idempotent: CREATE VIEW IF NOT EXISTS
    conn.executemany("INSERT INTO items (job, key, state, reason) VALUES ('j', ?, 'failed', ?)",
                     [("a", "not_found: /x/a.jpg"), ("b", "not_found: /x/b.jpg"),
                      ("c", "api 400: Unable to load image")])
    conn.execute("INSERT INTO runs (id, job, started_at, status) VALUES (1, 'j', 't', 'crashed')")
    conn.execute("INSERT INTO attempts (run_id, job, batch, attempt, keys, n, sent_at) "
                 "VALUES (1, 'j', 1, 1, '[\"a\", \"b\"]', 2, 't')")
    conn.commit()
    assert {tuple(r) for r in conn.execute(
        "SELECT reason, images FROM failures_by_reason")} == {
        ("not_found", 2), ("api 400: Unable to load image", 1)}
    assert [r[0] for r in conn.execute("SELECT key FROM unanswered_requests ORDER BY key")] == [
        "a", "b"]
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")} \
        == set(VIEWS)
    conn.close()


def _readme_recipes() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Browsing the state database"):]
    section = section[:section.index("\n## ", 5)]
    return [line[2:] for line in section.splitlines() if line.startswith("$ sqlite-utils ")]


def test_the_readmes_sqlite_utils_recipes_work_as_written(tmp_path, demo):
    recipes = _readme_recipes()
    assert len(recipes) >= 4
    exe = Path(sys.executable).with_name("sqlite-utils")
    for recipe in recipes:
        argv = shlex.split(recipe.split(" > ")[0])
        res = subprocess.run([str(exe), *argv[1:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, (recipe, res.stderr)
        assert res.stdout.strip(), recipe
        if "--json-cols" in argv:
            data = json.loads(res.stdout)
            assert data
            # JSON columns come back as JSON, not as strings holding JSON.
            for row in data:
                for col in ("bound_box", "result"):
                    if col in row and row[col] is not None:
                        assert not isinstance(row[col], str), (recipe, col)
        if "-t" in argv:
            assert re.search(r"^-+", res.stdout, re.M), recipe
