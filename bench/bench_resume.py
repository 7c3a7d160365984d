"""Benchmark: a rerun with everything already done, against listing the same folder and nothing else.

    python -m bench.bench_resume [--images 1000000]

A folder of N tiny files and a state database in which all N are `done` (written straight
through the store's schema, as a finished run would have left it). The baseline is draining
`sources.list_items` over the folder; the rerun is `run_job` with nothing to send. Each runs in
its own subprocess. A first rerun is not counted (it also checkpoints the freshly written
database's WAL, which a real rerun a day later does not); then, in each round, the listing and
the rerun run back to back, so that both see the same moment of a shared machine, and the
figure is the median of the rounds' ratios.
Goals: the rerun within 1.5x of the listing alone, and its process's peak memory under 400 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import (
    REPO,
    Figure,
    all_met,
    child_env,
    peak_kb,
    print_figures,
    write_job,
    write_tiny_files,
)

BENCH = "resume"
TIME_GOAL = 1.5
MEMORY_GOAL_MB = 400.0
INSERT_CHUNK = 50_000


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.job))))
        return 0
    figures = run(args)
    print_figures(figures, "\nresume figures")
    return 0 if all_met(figures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_resume", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000,
                        help="files listed and already done (default 1000000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="listing + rerun pairs measured (default 3)")
    parser.add_argument("--child", choices=("listing", "rerun"), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    n = args.images
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-"))
    try:
        seconds = write_tiny_files(tmp / "images", n)
        print(f"resume: {n:,} files written in {seconds:.1f} s")
        job_path = write_job(tmp, name="resume", images=tmp / "images")
        seconds = _fill_database(job_path, n)
        size = (tmp / "state.db").stat().st_size / 1e6
        print(f"resume: {n:,} done rows written in {seconds:.1f} s ({size:.0f} MB database)")
        _run_child("rerun", job_path)
        listing, reruns = [], []
        for _ in range(max(1, args.rounds)):
            listing.append(_run_child("listing", job_path))
            reruns.append(_run_child("rerun", job_path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in (*listing, *reruns):
        if r["items"] != n:
            raise SystemExit(f"resume: a child saw {r['items']:,} images, expected {n:,}: {r}")
    ratios = [r["seconds"] / b["seconds"] for b, r in zip(listing, reruns, strict=True)]
    ratio = statistics.median(ratios)
    peak = max(r["peak_kb"] for r in reruns) / 1024
    print("\nround  listing alone  rerun, nothing to send  ratio  rerun CPU  peak")
    for i, (b, r, x) in enumerate(zip(listing, reruns, ratios, strict=True), 1):
        print(f"{i:5d}  {b['seconds']:11.2f} s  {r['seconds']:20.2f} s  {x:5.2f}  "
              f"{r['cpu']:7.2f} s  {r['peak_kb'] / 1024:.0f} MB")
    print(f"median ratio {ratio:.2f}x; the rerun's peak memory {peak:.0f} MB "
          f"(the listing's {max(b['peak_kb'] for b in listing) / 1024:.0f} MB)")
    return [
        Figure(BENCH, f"rerun / listing ({n:,} done)", ratio, ".2f", f"< {TIME_GOAL}x",
               ratio < TIME_GOAL),
        Figure(BENCH, "rerun peak memory, MB", peak, ".0f", f"< {MEMORY_GOAL_MB:.0f} MB",
               peak < MEMORY_GOAL_MB),
    ]


def _fill_database(job_path: Path, n: int) -> float:
    """Every listed file as `done` for this job's request and policy, as a finished run leaves it."""
    from runner import sources
    from runner.answers import utcnow
    from runner.job import load_job
    from runner.prepare import prep_signature
    from runner.sources import iter_chunks
    from runner.store import Store

    started = time.perf_counter()
    job = load_job(job_path)
    request_sig, prep_sig, now = job.request_signature(), prep_signature(job), utcnow()
    result = json.dumps({"_status": {"code": 200, "text": "OK"}}, separators=(",", ":"))
    with Store(job.db_path) as store:
        run_id = store.begin_run(job.name, pid=0, endpoint=job.api.endpoint, budget=0)
        store.db.conn.execute("BEGIN")
        for chunk in iter_chunks(sources.list_items(job.source), INSERT_CHUNK):
            store.db.conn.executemany(
                "INSERT INTO items (job, key, uri, size, fingerprint, state, result, credits, "
                "content_hash, request_sig, prep_sig, sends, listed_run, first_seen, "
                "updated_at, answered_at) VALUES (?, ?, ?, ?, ?, 'done', ?, 10, ?, ?, ?, 1, ?, "
                "?, ?, ?)",
                [(job.name, it.key, it.uri, it.size, it.fingerprint, result,
                  hashlib.sha256(it.key.encode()).hexdigest(), request_sig, prep_sig, run_id,
                  now, now, now) for it in chunk])
        store.db.conn.execute("COMMIT")
        store.finish_run(run_id, status="finished", exit_code=0)
    return time.perf_counter() - started


def _run_child(what: str, job_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_resume", "--child", what, "--job", str(job_path)]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                         check=False, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"resume: the {what} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(what: str, job_path: Path) -> dict[str, Any]:
    from bench.fixtures import cpu_seconds
    from runner import sources
    from runner.executors import run_job
    from runner.job import load_job

    job = load_job(job_path)
    cpu = cpu_seconds()
    started = time.perf_counter()
    if what == "listing":
        items = sum(1 for _ in sources.list_items(job.source))
        extra: dict[str, Any] = {}
    else:
        summary = run_job(job)
        items = summary.unchanged
        extra = {"listed": summary.listed, "sent": summary.sent, "status": summary.status}
        if summary.sent or summary.listed != summary.unchanged:
            raise SystemExit(f"the rerun was not a no-op: {summary.as_dict()}")
    return {"items": items, "seconds": time.perf_counter() - started,
            "cpu": cpu_seconds() - cpu, "peak_kb": peak_kb(), **extra}


if __name__ == "__main__":
    raise SystemExit(main())
