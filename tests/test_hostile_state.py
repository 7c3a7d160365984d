"""Broken state databases: a folder, /dev/null, not a database, corrupt pages, a full disk, a
read-only place, odd characters in the path. One line naming the file and what to do, exit 74,
and no damage to an intact database."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import sys
from pathlib import Path

import pytest
from driver import export_rows, invoke, make_images, run_json, status_json, write_job

from runner import commit
from runner.commit import database_error, readonly_uri
from runner.errors import DatabaseError, ExitCode
from runner.store import Store

DATABASE = 74


def one_line_error(res, path: str | Path, *words: str) -> None:
    assert res.exit_code == DATABASE, res.output
    assert "Traceback" not in res.output
    # one line of error; the log's own lines (a timestamp, a level) may stand before it
    lines = [line for line in res.stderr.strip().splitlines()
             if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z]+ ", line)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"ximrun: state database {path}: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_the_exit_code_and_the_error_class_are_the_documented_ones():
    assert ExitCode.DATABASE == DATABASE
    assert issubclass(DatabaseError, commit.DatabaseError) and DatabaseError.exit_code == DATABASE


@pytest.mark.parametrize("message,words", [
    ("database or disk is full", "disk holding it is full"),
    ("attempt to write a readonly database", "cannot be written here"),
    ("file is not a database", "not a ximrun state database"),
    ("database disk image is malformed", "corrupt"),
    ("unable to open database file", "cannot be opened"),
    ("disk I/O error", "I/O error"),
    ("database is locked", "another process"),
])
def test_each_storage_error_says_what_it_means_and_what_to_do(message: str, words: str):
    err = database_error(sqlite3.OperationalError(message), Path("/x/s.db"))
    assert isinstance(err, DatabaseError) and "\n" not in str(err)
    assert str(err).startswith("state database /x/s.db: ") and words in str(err)
    assert str(err).endswith(f"({message})")


def test_a_folder_as_the_database_is_refused(tmp_path: Path):
    make_images(tmp_path / "imgs", 2)
    (tmp_path / "state" / "t.db").mkdir(parents=True)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs")
    for command in ("run", "status", "export", "plan"):
        one_line_error(invoke(command, str(job)), tmp_path / "state" / "t.db", "is a folder")


@pytest.mark.skipif(not os.path.exists("/dev/null") or sys.platform == "win32",
                    reason="POSIX devices")
def test_dev_null_as_the_database_is_refused_and_nothing_is_created_beside_it(tmp_path: Path):
    make_images(tmp_path / "imgs", 2)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs", db="/dev/null")
    lock_existed = os.path.exists("/dev/null.lock")
    for command in ("run", "status", "export", "plan"):
        one_line_error(invoke(command, str(job)), "/dev/null", "not a regular file")
    assert os.path.exists("/dev/null.lock") == lock_existed


def test_a_file_that_is_not_a_database_is_refused_and_left_as_it_was(tmp_path: Path):
    make_images(tmp_path / "imgs", 2)
    db = tmp_path / "state" / "t.db"
    db.parent.mkdir()
    garbage = b"these are my holiday notes, not a database\n" * 200
    db.write_bytes(garbage)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs")
    for command in ("run", "status", "export", "plan"):
        one_line_error(invoke(command, str(job)), db, "not a ximrun state database")
    assert db.read_bytes() == garbage


def test_corrupt_pages_are_reported_not_a_traceback(tmp_path: Path):
    make_images(tmp_path / "imgs", 30)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs")
    run_json(job)
    db = tmp_path / "state" / "t.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = c.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(db.read_bytes())
    for at in range(page, len(data), 7):  # every page but the first (the schema) scrambled
        data[at] = (data[at] * 31 + 17) % 256
    db.write_bytes(bytes(data))
    for command in ("run", "status", "export"):
        one_line_error(invoke(command, str(job)), db)


def test_a_full_disk_fails_the_run_with_74_and_the_database_stays_intact(tmp_path: Path,
                                                                          monkeypatch):
    make_images(tmp_path / "imgs", 5)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs")
    run_json(job)
    db = tmp_path / "state" / "t.db"
    before = export_rows(job)
    make_images(tmp_path / "imgs", 400, name="more{:04d}.jpg")

    # The disk fills up: SQLite's own SQLITE_FULL, from a page limit set on every connection.
    setup = commit.Database._setup

    def tiny_disk(self, create: bool) -> None:
        setup(self, create)
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    monkeypatch.setattr(commit.Database, "_setup", tiny_disk)
    one_line_error(invoke("run", str(job)), db, "disk holding it is full")
    monkeypatch.undo()

    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    after = export_rows(job)
    for key, row in before.items():
        assert after[key]["state"] == "done" and after[key]["result"] == row["result"]
    summary = run_json(job)  # space again: the run goes on where it stopped
    assert summary["done"] + 5 >= 405 and status_json(job)["states"]["done"] == 405


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root writes anywhere; POSIX permissions")
def test_a_read_only_place_is_reported_and_status_still_reads(tmp_path: Path):
    make_images(tmp_path / "imgs", 3)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs")
    run_json(job)
    state = tmp_path / "state"
    for f in state.iterdir():
        f.chmod(0o444)
    state.chmod(0o555)
    try:
        assert status_json(job)["states"]["done"] == 3
        make_images(tmp_path / "imgs", 1, name="new{:04d}.jpg")
        one_line_error(invoke("run", str(job)), state / "t.db", "cannot be written here")
    finally:
        state.chmod(0o755)


def test_status_and_export_open_the_database_read_only(tmp_path: Path):
    make_images(tmp_path / "imgs", 3)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs")
    run_json(job)
    db = tmp_path / "state" / "t.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    assert status_json(job)["states"]["done"] == 3
    assert len(export_rows(job)) == 3
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    with Store(db, create=False) as store, pytest.raises(DatabaseError, match="cannot be written"):
        store.db.write(lambda c: c.execute("DELETE FROM items"))


@pytest.mark.parametrize("name", ["a#b.db", "q?x=1.db", "100%.db", "sp ace%23.db"])
def test_a_database_path_with_uri_characters_works_and_leaves_no_stray_file(tmp_path: Path,
                                                                            name: str):
    make_images(tmp_path / "imgs", 2)
    job = write_job(tmp_path, "sandbox", tmp_path / "imgs", db=f"state/{name}")
    run_json(job)
    assert status_json(job)["states"]["done"] == 2
    assert len(export_rows(job)) == 2
    stray = {p.name for p in (tmp_path / "state").iterdir()} - {
        name, f"{name}-wal", f"{name}-shm", f"{name}.lock"}
    assert not stray, stray
    assert readonly_uri(tmp_path / name).startswith("file:///")
