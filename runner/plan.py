"""`plan`: what a run would do, with nothing sent and nothing written."""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from runner.job import Job
from runner.limits import job_figures
from runner.prepare import prep_signature, prepare_items
from runner.records import Ready, Refused
from runner.sources import check_sources, iter_chunks, list_items
from runner.store import Store, open_readonly
from runner.summary import KIND_COUNTERS, ProgressFn, Summary

PLAN_CHUNK = 500  # plan reads, it does not write: its chunks only pace its progress


def plan_limits(job: Job, to_send: int) -> dict[str, Any]:
    """Each limit, what is left of it, and whether it would stop a run that sends `to_send`
    images (and after how many)."""
    db = job.db_path
    with (open_readonly(db) if db.exists() else Store(":memory:")) as store:
        figures = job_figures(job, store)
    pi = job.credits.per_image
    for name, e in figures.items():
        left = e.get("left")
        if name in ("account", "duration") or left is None:
            continue
        can = to_send if pi == 0 and e["limit"] > 0 else (0 if pi == 0 else left // pi)
        e["stops_run"] = can < to_send
        e["images_before_stop"] = min(can, to_send)
    return figures


def plan_job(job: Job, progress: ProgressFn | None = None) -> Summary:
    """What `run` would do, nothing sent and nothing written: it reads and hashes new images."""
    s = Summary(job=job.name, status="plan", budget=job.credits.budget)
    started = time.monotonic()
    check_sources(job.source)
    db = job.db_path
    store = open_readonly(db) if db.exists() else Store(":memory:")
    request_sig, prep_sig = job.request_signature(), prep_signature(job)
    seen: set[str] = set()

    def skipped(why: str) -> None:  # sources.py has logged the row and why
        s.skipped(why, job.source.manifest)

    def count(r: Ready | Refused) -> None:
        if isinstance(r, Refused):
            if r.read_failed:
                s.failed += 1
            else:
                s.rejected += 1
                s.rejected_reasons[r.reason] = s.rejected_reasons.get(r.reason, 0) + 1
            return
        h = r.content_hash
        if h is not None and job.credits.reuse and (
                h in seen or store.find_answer(h, request_sig) is not None):
            s.reused += 1
            s.credits_saved += job.credits.per_image
            return
        if h is not None:
            seen.add(h)
        s.sent += 1

    workers = max(2, os.cpu_count() or 2)
    task = job.api.batch_size
    with store, ThreadPoolExecutor(workers, thread_name_prefix="plan") as pool:
        inflight: set[Future[list[Ready | Refused]]] = set()
        for chunk in iter_chunks(list_items(job.source, on_skip=skipped), PLAN_CHUNK):
            classified = store.classify(job.name, chunk, request_sig=request_sig,
                                        prep_sig=prep_sig, run_id=None)
            s.listed += len(chunk)
            for kind, n in classified.counts.items():
                name = KIND_COUNTERS[kind]
                setattr(s, name, getattr(s, name) + n)
            to_send = [x.item for x in classified.to_send]
            for i in range(0, len(to_send), task):
                inflight.add(pool.submit(prepare_items, job, to_send[i:i + task]))
                if len(inflight) >= 4 * workers:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    for f in done:
                        for r in f.result():
                            count(r)
            if progress:
                progress(s)
        for f in inflight:
            for r in f.result():
                count(r)
    s.credits = s.sent * job.credits.per_image
    s.limits = plan_limits(job, s.sent)
    s.elapsed_s = round(time.monotonic() - started, 3)
    return s
