"""The Dask executor on a real local cluster (two worker processes) against the emulator over HTTP:
the same answers as the local executor, a lost worker or coordinator loses nothing, budget holds."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from driver import (
    TOKEN,
    attempts_per_key,
    db_count,
    jpeg,
    make_images,
    run_json,
    sends,
    settle,
    start,
    wait_for,
    write_job,
    ximrun,
)

from runner.errors import JobError
from runner.executors import run_job
from runner.job import SandboxSettings, load_job
from runner.report import export_rows
from runner.sandbox import Sandbox

distributed = pytest.importorskip("distributed")

ENV = {"XIMILAR_TOKEN": TOKEN}
BATCH = 5
CONCURRENCY = 4
API = {"batch_size": BATCH, "concurrency": CONCURRENCY}
LOCAL_CLUSTER = {"kind": "dask", "workers": 2}  # started by the run itself


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                  dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        yield client


def on(cluster) -> dict[str, str]:
    """The [executor] table of a job run on the module's cluster."""
    return {"kind": "dask", "address": cluster.scheduler.address}


def image(i: int) -> bytes:
    return jpeg((i % 256, (i * 7) % 256, (i * 13) % 256), (32, 24))


def images(folder: Path, n: int) -> Path:
    make_images(folder, n, image=image, name="{:04d}.jpg")
    return folder


def rows(job_file: Path) -> dict[str, dict]:
    job = load_job(job_file, ENV)
    out = {r["key"]: r for r in export_rows(job)}
    for r in out.values():
        if r["result"]:
            r["result"]["_status"].pop("request_id", None)  # the emulator's, new every request
            r["result"].pop("_id")  # each image's own key
    return out


@pytest.mark.slow
def test_same_job_gives_the_same_database_as_the_local_executor(tmp_path, cluster, s3_bucket,
                                                                sample_data):
    objects = {f"in/{i:03d}.jpg": image(i) for i in range(40)}
    objects |= {f"in/copy{i}.jpg": image(3) for i in range(3)}  # paid once, reused
    objects |= {f"in/{p.name}": p.read_bytes() for p in sample_data.iterdir()
                if p.is_file() and p.suffix != ".md"}
    s3_bucket.put_many(objects)
    source = {"paths": s3_bucket.url("in/"), "storage_options": s3_bucket.storage_options}
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        local = write_job(tmp_path, sb, name="local", api=API, **source)
        on_dask = write_job(tmp_path, sb, name="dask", api=API, executor=on(cluster), **source)
        a = run_job(load_job(local, ENV))
        b = run_job(load_job(on_dask, ENV))
    assert (a.exit_code, b.exit_code) == (0, 0)
    assert (a.done, a.rejected, a.reused, a.credits) == (b.done, b.rejected, b.reused, b.credits)
    ra, rb = rows(local), rows(on_dask)
    assert ra.keys() == rb.keys() == {s3_bucket.url(k) for k in objects}
    fields = ("state", "reason", "result", "content_hash")
    assert {k: [r[f] for f in fields] for k, r in ra.items()} == \
           {k: [r[f] for f in fields] for k, r in rb.items()}
    # Which of the identical copies pays may differ; that one of them does may not.
    assert sum(r["credits"] for r in ra.values()) == sum(r["credits"] for r in rb.values())
    assert sum(r["reused_from"] is not None for r in rb.values()) == a.reused


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_lost(tmp_path, cluster):
    folder = images(tmp_path / "imgs", 120)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = load_job(write_job(tmp_path, sb, f"{folder}/", name="k", api=API,
                                 executor=on(cluster)), ENV)
        summary = []
        runner = threading.Thread(target=lambda: summary.append(run_job(job)))
        runner.start()
        wait_for(lambda: len(sb.ledger()) >= 3 * BATCH, "requests to reach the API", timeout=60)
        victim = next(iter(cluster.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        runner.join(120)
        counts = sends(sb)
    assert summary and summary[0].exit_code == 0, summary
    final = rows(job.path)
    assert {r["state"] for r in final.values()} == {"done"} and len(final) == 120
    assert set(counts) == set(final)
    # Only the batches the dead worker had in flight may have gone twice.
    assert sum(n - 1 for n in counts.values()) <= (CONCURRENCY + 2) * BATCH
    cluster.wait_for_workers(2, timeout=60)  # the nanny brought a new one


@pytest.mark.slow
def test_coordinator_killed_mid_run_then_rerun_completes(tmp_path):
    folder = images(tmp_path / "imgs", 100)
    db = tmp_path / "state" / "c.db"
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="c", api=API, executor=LOCAL_CLUSTER)
        child = start(tmp_path, "run", "-q", str(job), tag="killed")
        try:
            # killed once some answers are committed and more requests are in flight
            wait_for(lambda: (db_count(db, "SELECT count(*) FROM items WHERE state = 'done'")
                              >= 2 * BATCH and len(sb.ledger()) >= 4 * BATCH),
                     "answers committed and more requests in flight", child, timeout=120,
                     interval=0.05)
        finally:
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait()
        assert child.proc.returncode == -signal.SIGKILL
        # Accountable: a send task's batches were recorded in flight (in one transaction) before
        # the task existed, so whatever the API received is answered or named as in flight.
        received = {e.record_id for e in settle(sb)}
        done_before = {k for k, r in rows(job).items() if r["state"] == "done"}
        with sqlite3.connect(db) as conn:
            in_flight = {k for (keys,) in conn.execute(
                "SELECT keys FROM attempts WHERE closed_at IS NULL") for k in json.loads(keys)}
        assert received and received <= done_before | in_flight
        n_before = len(sb.ledger())
        again = ximrun(tmp_path, "run", "-q", str(job), tag="again", timeout=120)
        resent = {e.record_id for e in sb.ledger()[n_before:]}
    assert again.proc.returncode == 0, again.output()
    assert done_before and not done_before & resent  # nothing done was sent again
    assert {r["state"] for r in rows(job).values()} == {"done"}


@pytest.mark.slow
def test_a_coordinator_killed_while_workers_retry_never_counts_less_than_the_api_saw(tmp_path):
    # Half the requests fail with 500: the workers retry. Each retry's row is committed by the
    # coordinator, on the worker's word, before the retry leaves; a worker that gets no word
    # (its coordinator killed) withholds it. Before, retries were recorded when the task came
    # back, so a killed coordinator lost them: sends fewer than the requests the API saw.
    folder = images(tmp_path / "imgs", 80)
    db = tmp_path / "state" / "r.db"
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=150, p500=0.5, seed=5)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="r", executor=LOCAL_CLUSTER,
                        api=dict(API, max_retries=8))
        child = start(tmp_path, "run", "-q", str(job), tag="killed")
        try:
            wait_for(lambda: sum(n > 1 for n in sends(sb).values()) >= 2 * BATCH,
                     "retries reaching the API", child, timeout=120, interval=0.05)
        finally:
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait()
        settle(sb)
        seen_at_kill = sends(sb)
        counted = attempts_per_key(db)
        under = {k: (counted[k], n) for k, n in seen_at_kill.items() if counted[k] < n}
        assert not under, f"the attempts rows under-count what the API saw: {under}"
        again = ximrun(tmp_path, "run", "-q", str(job), tag="again", timeout=180)
        assert again.proc.returncode == 0, again.output()
        settle(sb)
        seen = sends(sb)
    final = rows(job)
    assert {r["state"] for r in final.values()} == {"done"}
    # One truth: items.sends is the attempts ledger, and never less than what the API saw.
    assert {k: r["sends"] for k, r in final.items() if r["sends"]} == dict(attempts_per_key(db))
    under = {k: (final[k]["sends"], n) for k, n in seen.items() if final[k]["sends"] < n}
    assert not under, f"ximrun under-counts what the API saw: {under}"


def test_a_retry_without_the_coordinators_word_in_time_is_not_sent_and_the_run_exits_69(
        tmp_path, cluster, monkeypatch):
    # A worker waits for the coordinator's word that a retry's row is committed; with none in
    # time it withholds the retry. Its images stay pending with the reason, the row is taken
    # back, and the run may not exit 0, which says that every image is final (it did: the
    # images ended pending without a reason, "finished").
    from runner.executors import dask_tasks  # with `distributed`, which this module skips without

    monkeypatch.setattr(dask_tasks, "ACK_TIMEOUT_S", 0.0)  # no word comes back that fast
    folder = images(tmp_path / "imgs", 40)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=20, p500=0.5, seed=3)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="w", api=API)
        summary = run_json(job, "--dask", cluster.scheduler.address, exit_code=69)
        seen, ledger = sends(sb), sb.ledger()
    final = rows(job)
    pending = {k for k, r in final.items() if r["state"] == "pending"}
    assert pending and {r["state"] for r in final.values()} == {"done", "pending"}
    assert summary["status"] == "finished_with_pending" and summary["pending"] == len(pending)
    assert "did not record the request in time" in summary["message"]
    assert all("did not record the request in time" in final[k]["reason"] for k in pending)
    assert all(seen[k] >= 1 for k in pending)  # each failed once: a retry was due
    # The rows recorded too late were taken back: sends are what the API saw, no more.
    assert {k: r["sends"] for k, r in final.items()} == {k: seen[k] for k in final}
    assert summary["requests"] == len({e.request_no for e in ledger})


@pytest.mark.slow
def test_ctrl_c_reaching_the_local_workers_too_stops_cleanly_with_exit_4(tmp_path):
    folder = images(tmp_path / "imgs", 100)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="i", api=API, executor=LOCAL_CLUSTER)
        # A new session: the signal goes to the run and its local cluster's workers, as a
        # terminal's Ctrl-C does, and to nothing else.
        child = start(tmp_path, "run", "-q", str(job), start_new_session=True)
        try:
            wait_for(lambda: len(sb.ledger()) >= 3 * BATCH, "requests to reach the API", child,
                     timeout=60, interval=0.05)
            os.killpg(child.proc.pid, signal.SIGINT)
            code = child.wait(timeout=60)
        finally:
            if child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGKILL)
    assert code == 4, child.output()
    states = Counter(r["state"] for r in rows(job).values())
    assert states["done"] and states["pending"] and set(states) == {"done", "pending"}


@pytest.mark.slow
def test_budget_holds_across_workers_with_the_dask_option(tmp_path, cluster):
    folder = images(tmp_path / "imgs", 40)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=50)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="b", api=API)
        summary = run_json(job, "--dask", cluster.scheduler.address, "--budget", "130",
                           exit_code=3)
        billed = len(sb.ledger())
    assert summary["credits"] == 130 and billed == 13
    assert Counter(r["state"] for r in rows(job).values()) == {"done": 13, "pending": 27}


def test_without_distributed_the_run_is_refused_before_anything_happens(tmp_path, sandbox,
                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import` sees when it is absent
    monkeypatch.delitem(sys.modules, "runner.executors.dask", raising=False)
    job = load_job(write_job(tmp_path, sandbox, f"{tmp_path}/", name="m", api=API,
                             executor={"kind": "dask"}), ENV)
    with pytest.raises(JobError, match=r"ximrun\[dask\]"):
        run_job(job)
    assert not job.db_path.exists() and sandbox.ledger() == []


def test_an_outage_on_the_cluster_leaves_images_pending_with_no_send_and_exits_69(tmp_path,
                                                                                  cluster):
    folder = images(tmp_path / "imgs", 40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    job = tmp_path / "down.toml"
    job.write_text(f'name = "down"\n[source]\npaths = ["{folder}/"]\n[api]\n'
                   f'endpoint = "http://127.0.0.1:{port}/collectibles/v2/tcg_id"\n'
                   f'batch_size = {BATCH}\nmax_retries = 1\nbreaker_failures = 2\n'
                   '[state]\ndb = "state/down.db"\n')
    summary = run_json(job, "--dask", cluster.scheduler.address, exit_code=69)
    assert summary["status"] == "api_unavailable"
    assert summary["failed"] == 0 and summary["requests"] == 0 and summary["sent"] == 0
    assert {r["state"] for r in rows(job).values()} == {"pending"}
    assert all(r["sends"] == 0 for r in rows(job).values())
    with sqlite3.connect(tmp_path / "state" / "down.db") as db:
        assert db.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0


@pytest.mark.slow
def test_every_limit_holds_on_the_cluster_with_lost_answers(tmp_path, cluster):
    """One coordinator decides: with 30 % of the answers lost after billing, the credits the API
    took stay within the run's limit, and the day's allowance is shared with the next run."""
    folder = images(tmp_path / "imgs", 60)
    with Sandbox(SandboxSettings(token=TOKEN, pdrop=0.3, seed=5)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="l", api=dict(API, max_retries=8),
                        credits={"per_day": 300, "timezone": "Asia/Tokyo"})
        s = run_json(job, "--dask", cluster.scheduler.address, "--max-credits", "200",
                     exit_code=3)
        assert s["status"] == "stopped_by_per_run"
        assert sum(e.billed for e in sb.ledger()) * 10 <= 200
        assert any(not e.answered for e in sb.ledger())  # answers were lost
        s = run_json(job, "--dask", cluster.scheduler.address, exit_code=3)
        assert s["status"] == "stopped_by_per_day"
        assert sum(e.billed for e in sb.ledger()) * 10 <= 300


@pytest.mark.slow
def test_max_duration_on_the_cluster(tmp_path, cluster):
    folder = images(tmp_path / "imgs", 60)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=500)) as sb:
        job = write_job(tmp_path, sb, f"{folder}/", name="d", api={"batch_size": 1,
                                                                  "concurrency": 2})
        s = run_json(job, "--dask", cluster.scheduler.address, "--max-duration", "3s",
                     exit_code=3)
        assert s["status"] == "stopped_by_duration"
        assert s["elapsed_s"] <= 3 + 0.5 + 1.0, s["elapsed_s"]
        done = {k for k, r in rows(job).items() if r["state"] == "done"}
        assert 0 < len(done) < 60 and {e.record_id for e in sb.ledger()} == done


class _NoPickle(Exception):
    """An error a third-party library might raise: it does not survive pickling."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(what)
        self.code = code

    def __reduce__(self):
        raise TypeError("cannot pickle this error")


def test_a_send_task_result_crosses_as_one_pickle_even_with_an_unpicklable_error():
    # What a send task returns is pickled by the worker itself (Dask would walk every outcome
    # of it on the coordinator's event loop); an error that cannot be pickled crosses as its
    # type and words, so that the batch's images are still settled.
    from runner.executors.dask_tasks import Sent, packed_results, unpacked
    from runner.records import RecordOutcome

    sent = Sent([RecordOutcome("a", ok=True, text='{"_id": "a"}')], lost=((2, ["a"]),))
    back = unpacked(packed_results([sent, Sent([], _NoPickle("the library broke", 7), (1,)),
                                      Sent([], ValueError("kept as it is"))]))
    assert back[0] == sent
    assert isinstance(back[1].error, RuntimeError)
    assert str(back[1].error) == "_NoPickle: the library broke" and back[1].forget == (1,)
    assert isinstance(back[2].error, ValueError) and str(back[2].error) == "kept as it is"


def test_batches_go_to_the_worker_holding_them_with_the_fewest_in_flight_up_to_its_room():
    # Each worker's client sends at most its share of the concurrency. Batches handed out in
    # the order their chunks came back gave one worker two chunks' sends while the other had
    # none, and the run went at half its concurrency for seconds at a time.
    from runner.executors.dask import _DaskBatch, _Queue
    from runner.records import Item, Ready, RequestRecord

    def batch(holder: str | None, n: int = 10) -> _DaskBatch:
        readies = [Ready(Item(f"{holder}{i}", f"/x/{i}", 1, "1:1"),
                         RequestRecord(f"{holder}{i}"), "h") for i in range(n)]
        return _DaskBatch(readies, (holder,), holder)

    q = _Queue()
    for _ in range(3):
        q.append(batch("A"))
    q.append(batch("B", 4))
    assert q.images == 34
    load = {"A": 3, "B": 0}
    assert q.next_holder(load, room=4) == (True, "B")  # fewest in flight, though queued last
    assert q.popleft("B").holder == "B" and q.images == 30
    load["B"] = 4
    assert q.next_holder(load, room=4) == (True, "A")
    load["A"] = 4
    assert q.next_holder(load, room=4) == (False, None)  # every holder at its room: wait
    q.append(batch(None))  # bytes from several workers' chunks: not counted per worker
    assert q.next_holder(load, room=4) == (True, None)
    q.appendleft(batch("A", 2))  # a lost answer's resend goes first
    assert len(q.head("A").readies) == 2
