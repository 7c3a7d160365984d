"""The Dask executor on a real local cluster (two worker processes) against the emulator over HTTP:
the same answers as the local executor, a lost worker or coordinator loses nothing, budget holds."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from runner.cli import main
from runner.errors import JobError
from runner.executors import run_job
from runner.job import SandboxSettings, load_job
from runner.report import export_rows
from runner.sandbox import Sandbox

distributed = pytest.importorskip("distributed")

TOKEN = "test-token"
ENV = {"XIMILAR_TOKEN": TOKEN}
BATCH = 5
CONCURRENCY = 4


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                  dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        yield client


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:04d}.jpg").write_bytes(jpeg(i))
    return folder


def write_job(tmp: Path, sb: Sandbox, name: str, source: str, executor: str = "",
              extra: str = "") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f'''
name = "{name}"
[source]
paths = ["{source}"]
exclude = ["*.md"]
{extra}
[api]
endpoint = "{sb.endpoint_url()}"
batch_size = {BATCH}
concurrency = {CONCURRENCY}
max_retries = 2
[state]
db = "state/{name}.db"
[executor]
{executor}
''')
    return path


def rows(job_file: Path) -> dict[str, dict]:
    job = load_job(job_file, ENV)
    out = {r["key"]: r for r in export_rows(job)}
    for r in out.values():
        if r["result"]:
            r["result"]["_status"].pop("request_id", None)  # the emulator's, new every request
            r["result"].pop("_id")  # a reused copy's is the key of the copy that was paid for
    return out


def sent(sb: Sandbox) -> Counter[str]:
    return Counter(e.record_id for e in sb.ledger())


def done_count(db: Path) -> int:
    """Images done so far, read without taking part in the run's writes."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT count(*) FROM items WHERE state = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


def test_same_job_gives_the_same_database_as_the_local_executor(tmp_path, cluster, s3_bucket,
                                                                sample_data):
    objects = {f"in/{i:03d}.jpg": jpeg(i) for i in range(40)}
    objects |= {f"in/copy{i}.jpg": jpeg(3) for i in range(3)}  # paid once, reused
    objects |= {f"in/{p.name}": p.read_bytes() for p in sample_data.iterdir()
                if p.is_file() and p.suffix != ".md"}
    s3_bucket.put_many(objects)
    opts = "\n".join(f'{k} = "{v}"' for k, v in s3_bucket.storage_options.items())
    extra = f"[source.storage_options]\n{opts}"
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        local = write_job(tmp_path, sb, "local", s3_bucket.url("in/"), extra=extra)
        on_dask = write_job(tmp_path, sb, "dask", s3_bucket.url("in/"), extra=extra,
                            executor=f'kind = "dask"\naddress = "{cluster.scheduler.address}"')
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


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_lost(tmp_path, cluster):
    folder = images(tmp_path / "imgs", 120)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = load_job(write_job(tmp_path, sb, "k", f"{folder}/",
                                 f'kind = "dask"\naddress = "{cluster.scheduler.address}"'), ENV)
        summary = []
        runner = threading.Thread(target=lambda: summary.append(run_job(job)))
        runner.start()
        wait_for(lambda: len(sb.ledger()) >= 3 * BATCH)
        victim = next(iter(cluster.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        runner.join(120)
        counts = sent(sb)
    assert summary and summary[0].exit_code == 0, summary
    final = rows(job.path)
    assert {r["state"] for r in final.values()} == {"done"} and len(final) == 120
    assert set(counts) == set(final)
    # Only the batches the dead worker had in flight may have gone twice.
    assert sum(n - 1 for n in counts.values()) <= (CONCURRENCY + 2) * BATCH
    cluster.wait_for_workers(2, timeout=60)  # the nanny brought a new one


def test_coordinator_killed_mid_run_then_rerun_completes(tmp_path):
    folder = images(tmp_path / "imgs", 100)
    cmd = [sys.executable, "-m", "runner", "run", "-q"]
    env = {**os.environ, **ENV}
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = write_job(tmp_path, sb, "c", f"{folder}/", 'kind = "dask"\nworkers = 2')
        proc = subprocess.Popen([*cmd, str(job)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # killed once some answers are committed and more requests are in flight
            wait_for(lambda: proc.poll() is not None
                     or (done_count(tmp_path / "state" / "c.db") >= 2 * BATCH
                         and len(sb.ledger()) >= 4 * BATCH), timeout_s=120)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        done_before = {k for k, r in rows(job).items() if r["state"] == "done"}
        n_before = len(sb.ledger())
        again = subprocess.run([*cmd, str(job)], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=120)
        resent = {e.record_id for e in sb.ledger()[n_before:]}
    assert again.returncode == 0, again.stderr
    assert done_before and not done_before & resent  # nothing done was sent again
    assert {r["state"] for r in rows(job).values()} == {"done"}


def test_ctrl_c_reaching_the_local_workers_too_stops_cleanly_with_exit_4(tmp_path):
    folder = images(tmp_path / "imgs", 100)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = write_job(tmp_path, sb, "i", f"{folder}/", 'kind = "dask"\nworkers = 2')
        # A new session: the signal goes to the run and its local cluster's workers, as a
        # terminal's Ctrl-C does, and to nothing else.
        proc = subprocess.Popen([sys.executable, "-m", "runner", "run", "-q", str(job)],
                                env={**os.environ, **ENV}, cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(sb.ledger()) >= 3 * BATCH or proc.poll() is not None)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 4
    states = Counter(r["state"] for r in rows(job).values())
    assert states["done"] and states["pending"] and set(states) == {"done", "pending"}


def test_budget_holds_across_workers_with_the_dask_option(tmp_path, cluster):
    folder = images(tmp_path / "imgs", 40)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=50)) as sb:
        job = write_job(tmp_path, sb, "b", f"{folder}/")
        res = CliRunner().invoke(main, ["run", str(job), "--dask", cluster.scheduler.address,
                                        "--budget", "130", "--json"], env=ENV,
                                 catch_exceptions=False)
        billed = len(sb.ledger())
    assert res.exit_code == 3, res.output
    summary = json.loads(res.stdout)
    assert summary["credits"] == 130 and billed == 13
    assert Counter(r["state"] for r in rows(job).values()) == {"done": 13, "pending": 27}


def test_without_distributed_the_run_is_refused_before_anything_happens(tmp_path, sandbox,
                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import` sees when it is absent
    monkeypatch.delitem(sys.modules, "runner.executors.dask", raising=False)
    job = load_job(write_job(tmp_path, sandbox, "m", f"{tmp_path}/", 'kind = "dask"'), ENV)
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
    res = CliRunner().invoke(main, ["run", str(job), "--dask", cluster.scheduler.address,
                                    "--json"], env=ENV, catch_exceptions=False)
    assert res.exit_code == 69, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "api_unavailable"
    assert summary["failed"] == 0 and summary["requests"] == 0 and summary["sent"] == 0
    assert {r["state"] for r in rows(job).values()} == {"pending"}
    assert all(r["sends"] == 0 for r in rows(job).values())
    with sqlite3.connect(tmp_path / "state" / "down.db") as db:
        assert db.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0
