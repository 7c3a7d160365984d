"""The SQLite checkpoint: classification for resume, one transaction per batch, accountability."""

import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from runner import report
from runner.answers import BatchAnswer
from runner.classify import (
    CHANGED,
    CHANGED_REQUEST,
    KEPT_FAILED,
    NEW,
    RESUMED,
    RETRY,
    UNCHANGED,
)
from runner.errors import DatabaseError
from runner.records import Item, RecordOutcome
from runner.store import Store


def item(key: str, fp: str = "10:1") -> Item:
    return Item(key=key, uri=key, size=10, fingerprint=fp)


def kinds(store, items, run_id=None, sig="req", prep="prep"):
    """Every item's kind: those the classification leaves out are unchanged, and the counts agree."""
    classified = store.classify("j", items, request_sig=sig, prep_sig=prep, run_id=run_id)
    out = {it.key: UNCHANGED for it in items}
    out.update({x.item.key: x.kind for x in classified.listed})
    assert classified.counts == {k: n for k, n in Counter(out.values()).items()}
    return out


def answer(key, ok=True, h=None, followers=(), final=True, attempts=1):
    rec = {"_id": key, "_status": {"code": 200 if ok else 400}}
    return BatchAnswer(item(key), RecordOutcome(key, ok=ok, record=rec, reason=None if ok else "api 400",
                                           final=final, attempts=attempts), h, tuple(followers))

def record_attempt(s, job, run, batch, attempt, keys):
    """One request's row, as the local executor writes it."""
    s.record_attempts(job, run, [(batch, attempt, keys)])


def record_batch(s, job, run, batch, answers, keep_open=(), **kw):
    """One answered batch; its credits."""
    return s.record_batches(job, run, [(batch, answers, keep_open)], **kw)[0]



def test_schema_is_browsable_and_in_wal_mode(tmp_path):
    with Store(tmp_path / "s.db") as s:
        tables = {r[0] for r in s.db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"items", "runs", "attempts"} <= tables
        assert s.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_only_a_recorded_answer_makes_an_image_done(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        assert kinds(s, [item("a"), item("b")], run) == {"a": NEW, "b": NEW}
        record_attempt(s, "j", run, 1, 1, ["a", "b"])
        # listed and sent, but no answer recorded: still to do on the next run
        assert kinds(s, [item("a"), item("b")]) == {"a": RESUMED, "b": RESUMED}
        credits = record_batch(s, "j", run, 1, [answer("a"), answer("b", ok=False)],
                                 request_sig="req", prep_sig="prep", per_image=10)
        assert credits == 10
        assert kinds(s, [item("a"), item("b")]) == {"a": UNCHANGED, "b": KEPT_FAILED}
        assert report.counts(s, "j")["done"] == 1 and report.counts(s, "j")["failed"] == 1
        assert s.spent("j") == 10


def test_changed_fingerprint_or_request_sends_again(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a")], run)
        record_batch(s, "j", run, 1, [answer("a")], request_sig="req", prep_sig="p", per_image=1)
        assert kinds(s, [item("a", fp="11:2")]) == {"a": CHANGED}
        assert kinds(s, [item("a")], sig="other") == {"a": CHANGED_REQUEST}


def test_retry_puts_failed_back_to_pending(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b")], run)
        record_batch(s, "j", run, 1, [answer("a", ok=False), answer("b", ok=False)],
                       request_sig="req", prep_sig="p", per_image=1)
        assert s.retry_failed("j") == 2
        assert kinds(s, [item("a")]) == {"a": RETRY}


def test_unanswered_attempts_of_a_dead_run_are_named(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b")], run)
        record_attempt(s, "j", run, 7, 1, ["a", "b"])
        # the process dies here; a later run starts
        run2 = s.begin_run("j", pid=2, endpoint="e", budget=0)
        assert s.run_row(run)["status"] == "crashed"
        lost = report.unanswered(s, "j", running_run=run2)
        assert [u["keys"] for u in lost] == [["a", "b"]]


def test_followers_share_the_answer_for_free(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("copy")], run)
        record_batch(s, "j", run, 1, [answer("a", h="h1", followers=[item("copy")])],
                       request_sig="req", prep_sig="p", per_image=10)
        rows = {r["key"]: r for r in report.stored_rows(s.path, "j")}
        assert rows["copy"]["state"] == "done" and rows["copy"]["credits"] == 0
        assert rows["copy"]["reused_from"] == "a"
        assert s.find_answer("h1", "req")[1] == "a"
        assert s.find_answer("h1", "other-request") is None
        assert s.run_row(run)["credits_saved"] == 10


def test_not_final_outcome_leaves_the_image_pending(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a")], run)
        record_batch(s, "j", run, 1, [answer("a", ok=False, final=False)], request_sig="req",
                       prep_sig="p", per_image=10)
        assert report.counts(s, "j")["pending"] == 1


def test_images_no_longer_listed_are_kept_and_flagged_missing(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b")], run)
        run2 = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a")], run2)
        assert s.mark_missing("j", run2) == 1
        assert report.counts(s, "j")["missing"] == 1


def test_a_reader_sees_committed_batches_while_the_writer_runs(tmp_path):
    db = tmp_path / "s.db"
    with Store(db) as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a")], run)
        record_batch(s, "j", run, 1, [answer("a")], request_sig="req", prep_sig="p", per_image=1)
        reader = sqlite3.connect(db)
        assert reader.execute("SELECT state FROM items").fetchone()[0] == "done"
        reader.close()


def committed_attempts(path):
    """What another process would see: a fresh connection to the file."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT batch FROM attempts")}
    finally:
        conn.close()


def test_the_writer_commits_before_each_caller_returns(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item(f"k{i}") for i in range(64)], run)
        with s.grouped():
            def one(i):
                record_attempt(s, "j", run, i, 1, [f"k{i}"])
                # Returned: the row is on disk for any other connection (the request may leave).
                assert i in committed_attempts(path)
                record_batch(s, "j", run, i, [answer(f"k{i}")], request_sig="req",
                               prep_sig="prep", per_image=10)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one, range(64)))
        # Sixteen threads at once share transactions; every write and counter is there once.
        assert s.stats.writes >= 128 and s.stats.transactions <= s.stats.writes
        assert report.counts(s, "j")["done"] == 64
        row = s.run_row(run)
        assert (row["requests"], row["sent"], row["done"], row["credits"]) == (64, 64, 64, 640)
        assert report.unanswered(s, "j") == []


def test_a_failing_write_in_a_group_fails_alone(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b")], run)
        with s.grouped():
            start = threading.Barrier(2)

            def good():
                start.wait()
                record_attempt(s, "j", run, 1, 1, ["b"])

            with ThreadPoolExecutor(2) as pool:
                ok = pool.submit(good)
                start.wait()
                with pytest.raises(sqlite3.IntegrityError):  # no such run: a foreign key fails
                    record_attempt(s, "j", run + 1, 1, 1, ["a"])
                ok.result()
        assert s.run_row(run)["requests"] == 1
        assert [u["keys"] for u in report.unanswered(s, "j")] == [["b"]]


def test_a_group_commits_in_one_transaction_and_again_write_by_write_when_one_fails(
        tmp_path):
    def bad(c):
        c.execute("INSERT INTO items (job, key) VALUES ('j', 'a')")  # a duplicate key

    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b"), item("c")], run)
        with s.grouped():
            for group, failing in (([0, 1], False), ([2, "bad", 3], True)):
                before = s.stats.transactions
                with s.db.lock:  # the writer thread waits, so the writes queue up as one group
                    waits = [s.db.write_soon(bad if k == "bad" else
                                             s._attempt_rows("j", run, [(k, 1, [f"k{k}"])]))
                             for k in group]
                for k, wait in zip(group, waits, strict=True):
                    if k == "bad":
                        with pytest.raises(sqlite3.IntegrityError):
                            wait()
                    else:
                        wait()
                # Together at first; again, a savepoint each, only when one of them failed.
                assert s.stats.transactions - before == (2 if failing else 1)
        assert s.run_row(run)["requests"] == 4
        assert sorted(u["batch"] for u in report.unanswered(s, "j")) == [0, 1, 2, 3]


def test_the_listing_returns_only_what_must_happen(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        first = s.classify("j", [item(f"k{i}") for i in range(1200)], request_sig="req",
                           prep_sig="prep", run_id=run)
        assert first.counts == {NEW: 1200} and len(first.to_send) == 1200
        record_batch(s, "j", run, 1, [answer(f"k{i}") for i in range(1000)], request_sig="req",
                       prep_sig="prep", per_image=1)
        s.finish_run(run, status="finished", exit_code=0)
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        again = s.classify("j", [item(f"k{i}") for i in range(1200)] + [item("new")],
                           request_sig="req", prep_sig="prep", run_id=run)
        assert again.counts == {UNCHANGED: 1000, RESUMED: 200, NEW: 1}
        assert {x.item.key for x in again.listed} == {f"k{i}" for i in range(1000, 1200)} | {"new"}
        assert s.run_row(run)["listed"] == 1201
        assert s.mark_missing("j", run) == 0


def test_a_unique_listing_that_names_every_row_needs_no_index(tmp_path):
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b"), item("c")], run)
        record_batch(s, "j", run, 1, [answer("a"), answer("b", ok=False)], request_sig="req",
                       prep_sig="prep", per_image=1)
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("c")], run)
        assert s.mark_missing("j", run, unique_listing=True) == 1  # b is gone: counts differ
        assert s.count_listed("j", "failed") == 0  # b failed, but it was not listed
        # Everything listed again: no index is built, b is no longer missing, counts still right.
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item("a"), item("b"), item("c")], run)
        assert s.mark_missing("j", run, unique_listing=True) == 0
        assert report.counts(s, "j")["missing"] == 0
        assert (s.count_listed("j", "pending"), s.count_listed("j", "failed")) == (1, 1)
        indexes = {r[0] for r in s.db.conn.execute("SELECT name FROM temp.sqlite_master")}
        assert "listed_key" not in indexes


def test_keys_in_any_script_are_recognised_on_the_next_run(tmp_path):
    keys = ["/in/é.jpg", "/in/😀 card.jpg", "/in/日本.jpg", '/in/q"uote\\.jpg', "/in/tab\there.jpg"]
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        assert set(kinds(s, [item(k) for k in keys], run).values()) == {NEW}
        record_batch(s, "j", run, 1, [answer(k) for k in keys], request_sig="req",
                       prep_sig="prep", per_image=1)
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        assert set(kinds(s, [item(k) for k in keys], run).values()) == {UNCHANGED}
        assert s.mark_missing("j", run, unique_listing=True) == 0


def test_without_sqlite_json_the_listing_is_classified_the_same(tmp_path):
    with Store(tmp_path / "s.db") as s:
        s._json_each = False  # an SQLite built without its JSON functions
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        assert kinds(s, [item("a"), item("b")], run) == {"a": NEW, "b": NEW}
        record_batch(s, "j", run, 1, [answer("a")], request_sig="req", prep_sig="prep",
                       per_image=1)
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        assert kinds(s, [item("a"), item("b")], run) == {"a": UNCHANGED, "b": RESUMED}
        assert s.mark_missing("j", run, unique_listing=True) == 0


def test_a_write_after_which_sqlite_ended_the_transaction_fails_every_write_of_its_group(tmp_path):
    """SQLite rolls back the whole transaction by itself after some errors (a full disk): the
    group's writes all get that error, not a 'no such savepoint' of the retry one by one."""

    def ended_by_sqlite(c):
        c.execute("ROLLBACK")  # what SQLITE_FULL may do to the transaction
        raise sqlite3.OperationalError("database or disk is full")

    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        with s.grouped():
            with s.db.lock:  # the writer thread waits, so the writes queue up as one group
                waits = [s.db.write_soon(s._attempt_rows("j", run, [(0, 1, ["a"])])),
                         s.db.write_soon(ended_by_sqlite),
                         s.db.write_soon(s._attempt_rows("j", run, [(1, 1, ["b"])]))]
            for wait in waits:
                with pytest.raises(DatabaseError, match="the disk holding it is full"):
                    wait()
        assert report.unanswered(s, "j") == []  # nothing of the group was written


def test_several_requests_and_several_answered_batches_each_commit_in_one_transaction(tmp_path):
    # The Dask coordinator records a send task's batches together: their first requests before
    # the task leaves, their answers when it comes back.
    with Store(tmp_path / "s.db") as s:
        run = s.begin_run("j", pid=1, endpoint="e", budget=0)
        kinds(s, [item(k) for k in "abcde"], run)
        before = s.stats.transactions
        s.record_attempts("j", run, [(1, 1, ["a", "b"]), (2, 1, ["c", "d"]), (2, 2, ["d"]),
                                     (3, 1, ["e"])])
        assert s.stats.transactions - before == 1
        sends = dict(s.db.conn.execute("SELECT key, sends FROM items WHERE job = 'j'").fetchall())
        assert sends == {"a": 1, "b": 1, "c": 1, "d": 2, "e": 1}
        before = s.stats.transactions
        credits = s.record_batches(
            "j", run, [(1, [answer("a"), answer("b", ok=False)], ()),
                       (2, [answer("c"), answer("d")], {1}),  # its first answer was lost
                       (3, [answer("e", ok=False, final=False)], ())],
            request_sig="req", prep_sig="p", per_image=5)
        assert s.stats.transactions - before == 1
        assert credits == [5, 10, 0]
        states = dict(s.db.conn.execute("SELECT key, state FROM items WHERE job = 'j'").fetchall())
        assert states == {"a": "done", "b": "failed", "c": "done", "d": "done", "e": "pending"}
        still_open = s.db.conn.execute(
            "SELECT batch, attempt FROM attempts WHERE closed_at IS NULL ORDER BY batch").fetchall()
        assert [tuple(r) for r in still_open] == [(2, 1)]  # the lost answer's request stays open
        row = s.run_row(run)
        assert (row["requests"], row["done"], row["failed"], row["credits"]) == (4, 3, 1, 15)
