"""Copies of an image routed while its answer is being committed: settled by that answer, never
sent and never paid again. The coordinator's routing runs beside the commit, so the test stands in
for it at the one instant that matters: during `record_batches`."""

from __future__ import annotations

import threading

import pytest

from runner.job import load_job
from runner.records import Item, Ready, RecordOutcome, RequestRecord
from runner.report import export_rows
from runner.run import Run
from runner.store import Store
from runner.summary import RunOptions


def item(key: str) -> Item:
    return Item(key=key, uri=key, size=10, fingerprint=f"10:{key}")


@pytest.fixture
def run(tmp_path):
    job_file = tmp_path / "j.toml"
    job_file.write_text('name = "j"\n[source]\npaths = ["imgs/"]\n[state]\ndb = "s.db"\n')
    job = load_job(job_file)
    with Store(job.db_path) as store:
        r = Run(job, store, None, RunOptions(), threading.Event(), None)  # type: ignore[arg-type]
        r.run_id = store.begin_run("j", pid=1, endpoint="e", budget=0)
        store.classify("j", [item(k) for k in ("lead", "early", "late")],
                       request_sig=r.request_sig, prep_sig=r.prep_sig, run_id=r.run_id)
        yield r


def answer_with_a_late_copy(run: Run, ok: bool) -> None:
    """`lead` is sent with `early` already waiting on it; `late` joins during the commit."""
    run.waiting["h"] = [item("early")]
    commit = run.store.record_batches

    def record_batches(*args, **kwargs):
        with run._hash_lock:  # what route does when the copy's preparation finishes now
            run.waiting["h"].append(item("late"))
        return commit(*args, **kwargs)

    run.store.record_batches = record_batches  # type: ignore[method-assign]
    lead = Ready(item("lead"), RequestRecord("lead", data=b"x"), "h")
    record = {"_id": "lead", "_status": {"code": 200 if ok else 400}}
    outcome = RecordOutcome("lead", ok=ok, record=record, reason=None if ok else "api 400",
                            final=True, attempts=1)
    run.record_answers(1, [lead], [outcome])


def test_a_copy_that_arrives_during_the_commit_reuses_the_answer_for_free(run):
    answer_with_a_late_copy(run, ok=True)
    rows = {r["key"]: r for r in export_rows(run.job)}
    assert {k: (r["state"], r["credits"], r["reused_from"]) for k, r in rows.items()} == {
        "lead": ("done", 10, None), "early": ("done", 0, "lead"), "late": ("done", 0, "lead")}
    # Each copy's record is its own (its _id), with the paying image's analysis.
    for copy in ("early", "late"):
        assert rows[copy]["result"] == {**rows["lead"]["result"], "_id": copy}
    assert run.waiting == {}
    s = run.summary
    assert (s.done, s.reused, s.credits, s.credits_saved) == (3, 2, 10, 20)
    assert run.store.run_row(run.run_id)["credits"] == 10


def test_a_copy_that_arrives_during_the_commit_fails_with_its_original(run):
    answer_with_a_late_copy(run, ok=False)
    rows = {r["key"]: r for r in export_rows(run.job)}
    assert {k: r["state"] for k, r in rows.items()} == {"lead": "failed", "early": "failed",
                                                        "late": "failed"}
    assert rows["late"]["reason"] == "same bytes as lead: api 400"
    assert run.waiting == {} and run.summary.failed == 3 and run.summary.credits == 0
