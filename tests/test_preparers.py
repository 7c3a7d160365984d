"""Preparation in worker processes (runner/executors/preparers.py), through the real CLI.

A run longer than PROCESSES_AFTER images prepares in worker processes and records what a short
run (threads only) records; a worker killed in the middle of a run costs no image; a script
calling run_job without the `__main__` guard, or a daemonic process, goes on with threads;
SIGTERM to the whole process group stops the run cleanly; a worker imports little; photos to
resize start a worker per core.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from driver import (
    CHILD_API,
    REPO,
    TOKEN,
    child_env,
    export_rows,
    make_images,
    sends,
    start,
    wait_for,
    write_job,
    ximrun,
)

from runner.executors.preparers import PROCESSES_AFTER
from runner.job import SandboxSettings
from runner.sandbox import Sandbox


def workers_of(pid: int) -> list[int]:
    """The preparation workers among a process's children (not multiprocessing's tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def has_pillow(pid: int) -> bool:
    try:
        return "_imaging" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def check_rows(job: Path, paths: list[Path]) -> None:
    rows = export_rows(job)
    assert len(rows) == len(paths)
    for p in paths:
        row = rows[str(p)]
        assert row["state"] == "done", row
        # Sent as they are (small JPEGs): the content hash is the file's own.
        assert row["content_hash"] == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_long_run_prepares_in_worker_processes_and_records_what_threads_record(tmp_path):
    n = PROCESSES_AFTER + 200
    paths = make_images(tmp_path / "imgs", n)
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", api=CHILD_API)
        run = ximrun(tmp_path, "run", str(job), "--json")
        assert run.proc.returncode == 0, run.output()
        assert "preparation moves to" in run.stderr
        assert "could not start" not in run.stderr
        summary = json.loads(run.stdout)
        assert (summary["done"], summary["failed"], summary["rejected"]) == (n, 0, 0)
        assert set(sends(sb).values()) == {1}
    check_rows(job, paths)


@pytest.mark.slow
def test_photos_to_resize_start_a_worker_per_core(tmp_path):
    # One worker keeps small images ahead of the API; photos to downscale cost the threads more
    # than preparers.HEAVY_S each, and the run starts a worker per core for them (the same
    # pixels in every file, a comment making each file its own).
    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").resize((1600, 1200)).convert("RGB").save(buf, "JPEG", quality=90)
    photo = buf.getvalue()
    n = PROCESSES_AFTER + 60

    def image(i: int) -> bytes:
        note = f"photo {i}".encode()
        return photo[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + photo[2:]

    make_images(tmp_path / "imgs", n, image=image)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=50)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", images={"max_side": 1024},
                        api=dict(CHILD_API, batch_size=10, concurrency=4))
        # A budget of 5 batches: the emulator's own analysis of each photo is slow, and the
        # workers are decided on by then.
        run = ximrun(tmp_path, "run", str(job), "--json", "--budget", "500")
    assert run.proc.returncode == 3, run.output()
    assert json.loads(run.stdout)["done"] == 50
    assert "the images are heavy to prepare: up to 2 worker process(es)" in run.stderr, run.stderr


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_no_image(tmp_path):
    n = PROCESSES_AFTER + 500
    paths = make_images(tmp_path / "imgs", n)
    # A slow API keeps the run going for seconds while its preparation goes on in workers.
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=150)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=10, concurrency=2))
        child = start(tmp_path, "run", str(job), "--json")
        # A worker that has loaded Pillow's decoders has started and prepares.
        wait_for(lambda: any(has_pillow(w) for w in workers_of(child.proc.pid)),
                 "a preparation worker at work", child)
        time.sleep(0.5)
        os.kill(next(w for w in workers_of(child.proc.pid) if has_pillow(w)), signal.SIGKILL)
        assert child.wait() == 0, child.output()
        assert "a preparing process died" in child.stderr, child.output()
        summary = json.loads(child.stdout)
        assert (summary["done"], summary["failed"]) == (n, 0), summary
        assert set(sends(sb).values()) == {1}
    check_rows(job, paths)


@pytest.mark.slow
def test_a_script_without_the_main_guard_goes_on_with_threads(tmp_path):
    n = PROCESSES_AFTER + 100
    make_images(tmp_path / "imgs", n)
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", api=CHILD_API)
        script = tmp_path / "unguarded.py"
        # What a spawned worker imports again first: without the guard it would run the job
        # a second time, and fails to start.
        script.write_text(
            "import sys\nfrom runner import load_job, run_job\n"
            f"s = run_job(load_job({str(job)!r}))\n"
            "print('done', s.done, 'failed', s.failed)\n", encoding="utf-8")
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"done {n} failed 0" in proc.stdout.splitlines()[-1], proc.stdout + proc.stderr
        assert "preparation goes on in threads" in proc.stderr
        assert set(sends(sb).values()) == {1}


@pytest.mark.slow
def test_sigterm_to_the_whole_service_stops_the_run_cleanly_with_its_workers(tmp_path):
    # A service manager stopping the unit signals every process of it, the workers included.
    n = PROCESSES_AFTER + 500
    make_images(tmp_path / "imgs", n)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=150)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs",
                        api=dict(CHILD_API, batch_size=10, concurrency=2))
        child = start(tmp_path, "run", str(job), "--json", start_new_session=True)
        wait_for(lambda: any(has_pillow(w) for w in workers_of(child.proc.pid)),
                 "a preparation worker at work", child)
        workers = workers_of(child.proc.pid)
        os.killpg(child.proc.pid, signal.SIGTERM)
        assert child.wait() == 4, child.output()
        assert "Traceback" not in child.stderr and "died" not in child.stderr, child.output()
        summary = json.loads(child.stdout)
        assert summary["status"] == "interrupted" and summary["failed"] == 0, summary
        # Every image listed before the stop is done or pending (the listing may not have
        # reached the last ones: the workers start as soon as it shows a long run).
        assert summary["done"] + summary["pending"] == summary["listed"] <= n
        wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers),
                 "the workers to end")
        assert set(sends(sb).values()) <= {1}


def test_a_worker_imports_little_before_its_first_image():
    # A worker's start (an interpreter importing what prepare_compact needs) is what the run
    # waits for before its preparation leaves the run's threads: no fsspec, no HTTP client, no
    # Pillow plugin for a format that is never decoded, no HEIF library before a HEIF file.
    unwanted = ("fsspec", "urllib3", "click", "sqlite3", "PIL.PdfImagePlugin",
                "PIL.EpsImagePlugin", "PIL.IcnsImagePlugin", "pillow_heif")
    code = ("import sys, runner.prepare, runner.images; "
            f"print(sorted(m for m in {unwanted!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(), check=True).stdout.strip()
    assert out == "[]"
    # ... yet every format images.py sniffs has its decoder: the plugins it imports by name are
    # the ones its `_DECODERS` table names (HEIF from pillow-heif, with its first file).
    code = ("from PIL import Image; from runner import images; "
            "print(sorted({d for ds in images._DECODERS.values() for d in ds} - set(Image.OPEN)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(), check=True).stdout.strip()
    assert out == "['HEIF']"


def _run_in_daemon(job_path: str, out: Any) -> None:
    import logging

    from runner import load_job, run_job

    caught: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    logging.getLogger("ximrun").addHandler(Keep())
    s = run_job(load_job(job_path))
    out.put((s.done, s.failed, caught))


@pytest.mark.slow
def test_a_daemonic_process_with_no_children_allowed_runs_the_job_on_threads(tmp_path,
                                                                            monkeypatch):
    # A task queue's worker (Celery's prefork pool) is a daemonic process: it may start none.
    import multiprocessing

    n = PROCESSES_AFTER + 100
    make_images(tmp_path / "imgs", n)
    with Sandbox(SandboxSettings(token=TOKEN)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", api=CHILD_API)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        monkeypatch.setenv("XIMILAR_TOKEN", TOKEN)  # the child's environment, at its start
        p = ctx.Process(target=_run_in_daemon, args=(str(job), out), daemon=True)
        p.start()
        done, failed, said = out.get(timeout=120)
        p.join(30)
        assert (done, failed) == (n, 0)
        assert any("preparation goes on in threads" in m for m in said), said
        assert set(sends(sb).values()) == {1}


@pytest.mark.slow
def test_workers_prepare_every_sample_file_as_threads_do(tmp_path):
    # Every kind of file the demo holds (conversions, rejections with their reasons, broken
    # files), prepared at the end of a long run by the workers and in a short run by threads.
    samples = sorted(p for p in (REPO / "sample_data").iterdir() if p.name != "README.md")
    make_images(tmp_path / "long", PROCESSES_AFTER + 300)
    (tmp_path / "short").mkdir()
    for p in samples:
        shutil.copy(p, tmp_path / "long" / f"zz-{p.name}")  # listed last: the workers are up
        shutil.copy(p, tmp_path / "short" / p.name)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=50)) as sb:
        api = dict(CHILD_API, batch_size=10, concurrency=2)
        long_job = write_job(tmp_path, sb, tmp_path / "long", name="long", api=api)
        short_job = write_job(tmp_path, sb, tmp_path / "short", name="short", api=api)
        for job in (long_job, short_job):
            run = ximrun(tmp_path, "run", str(job), "--json", tag=job.stem)
            assert run.proc.returncode in (0, 1), run.output()
        assert "preparation moves to" in (tmp_path / "long-0.err").read_text()
    fields = ("state", "reason", "content_hash")
    long_rows = {Path(k).name.removeprefix("zz-"): {f: r[f] for f in fields}
                 for k, r in export_rows(long_job).items() if Path(k).name.startswith("zz-")}
    short_rows = {Path(k).name: {f: r[f] for f in fields}
                  for k, r in export_rows(short_job).items()}
    assert len(short_rows) == len(samples)
    assert long_rows == short_rows
    assert {r["state"] for r in short_rows.values()} >= {"done", "rejected"}


@pytest.mark.parametrize(("concurrency", "batches"), [(8, 4), (16, 4), (32, 8), (200, 8)])
def test_a_process_task_grows_only_while_two_per_worker_fit_the_window(tmp_path, monkeypatch,
                                                                       concurrency, batches):
    # A bigger task costs less per image in pipes and pickles, but a worker whose window holds
    # no second task waits for the run between tasks: 12-megapixel photos would then be prepared
    # on one core of two. The window is the local executor's (concurrency batches' worth).
    from runner.executors.preparers import Preparers
    from runner.job import load_job

    monkeypatch.setenv("XIMILAR_TOKEN", "t")
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/", tmp_path,
                             api={"batch_size": 10, "concurrency": concurrency}))
    with Preparers(job, 2, processes=True, workers=2, window=10 * concurrency) as preparers:
        assert preparers._process_batches == batches
        assert preparers.batches_per_task == 1  # threads until the workers are up
