"""Benchmark: one job on a Dask cluster of 1, 2 and 4 workers against the emulator at 200 ms latency.

    python -m bench.bench_dask [--images 3000] [--latency-ms 200] [--per-worker 8]

Each worker may have `--per-worker` requests in flight (the job's concurrency is that times the
number of workers), so the best any client can do grows with the workers: concurrency x batch /
latency images per second. Reported per worker count: throughput and its ratio to the 1-worker
run, and the coordinator's CPU share (its process CPU time / wall time). The coordinator runs in
a child process of its own, the scheduler, the workers and the emulator elsewhere, so that its
CPU time is its own; images per second divided by that share is how far one coordinator goes.

The goal: the coordinator's CPU per image, the median over the worker counts, at most 100 us
(one coordinator's own work keeps up with 10,000 images a second).

A run also costs its coordinator a fixed amount whatever its size (the Dask client's connection,
the state database's set-up and summary): after the warm-up, a run of `--small` images is
measured too, and the difference between the two runs gives the coordinator's cost per further
image, the figure that decides how far one coordinator goes on a catalog of millions.
"""

from __future__ import annotations

import argparse
import json
import os
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
    cpu_seconds,
    print_figures,
    set_bench_token,
    write_job,
    write_tiny_jpegs,
)

BENCH = "dask"
BATCH = 10
GOAL_US_PER_IMAGE = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_dask", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="images to send (default 3000)")
    parser.add_argument("--latency-ms", type=float, default=200.0,
                        help="the emulator's latency per request (default 200)")
    parser.add_argument("--per-worker", type=int, default=8,
                        help="requests in flight per worker (default 8)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--small", type=int, default=100,
                        help="images of the small run that tells the fixed cost (default 100)")
    parser.add_argument("--child", nargs=3, metavar=("WARM_UP_JOB", "SMALL_JOB", "JOB"),
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    figures = run(args)
    print_figures(figures, "\ndask figures")
    return 0 if all_met(figures) else 1


def run(args: argparse.Namespace) -> list[Figure]:
    import distributed

    from runner.job import SandboxSettings
    from runner.sandbox import Sandbox

    n, latency_s = args.images, args.latency_ms / 1000
    counts = [int(x) for x in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-dask-"))
    token, restore_token = set_bench_token()
    results: dict[int, dict[str, Any]] = {}
    try:
        if not 0 < args.small < n:
            raise SystemExit(f"dask: --small must be between 0 and --images ({n})")
        seconds = write_tiny_jpegs(tmp / "images", n)
        write_tiny_jpegs(tmp / "warm-up", 200, seed=1)
        write_tiny_jpegs(tmp / "small", args.small, seed=2)
        print(f"dask: {n:,} distinct 64x48 JPEGs written in {seconds:.1f} s; emulator latency "
              f"{args.latency_ms:.0f} ms, batch {BATCH}, {args.per_worker} requests in flight "
              f"per worker; {os.cpu_count()} CPUs here")
        settings = SandboxSettings(latency_ms=args.latency_ms, token=token, credits=10**12,
                                   max_records=BATCH)
        with Sandbox(settings) as sb:
            for workers in counts:
                concurrency = args.per_worker * workers
                with distributed.LocalCluster(n_workers=workers, processes=True,
                                              threads_per_worker=args.per_worker + 1,
                                              dashboard_address=None) as cluster:
                    executor = (f'\n[executor]\nkind = "dask"\n'
                                f'address = "{cluster.scheduler_address}"\n')
                    jobs = [write_job(tmp, name=f"{name}-w{workers}", images=tmp / folder,
                                      endpoint=sb.endpoint_url(), concurrency=concurrency,
                                      batch_size=BATCH, db=f"{name}-w{workers}.db",
                                      extra=executor)
                            for name, folder in (("warm-up", "warm-up"), ("small", "small"),
                                                 ("run", "images"))]
                    r = _run_child(*jobs)
                if r["done"] != n:
                    raise SystemExit(f"dask: {r['done']} of {n} images done with {workers} "
                                     f"worker(s): {r['status']}")
                r["best"] = concurrency * BATCH / latency_s
                r["further"] = (r["cpu"] - r["small_cpu"]) / (n - args.small)
                results[workers] = r
                _report(workers, concurrency, n, args.small, r)
    finally:
        restore_token()
        shutil.rmtree(tmp, ignore_errors=True)

    base = n / results[counts[0]]["wall"]
    figures: list[Figure] = []
    for workers, r in results.items():
        rate, share = n / r["wall"], r["cpu"] / r["wall"]
        figures += [
            Figure(BENCH, f"{workers} worker(s) img/s vs {counts[0]} worker(s)", rate / base,
                   ".2f", "", None),
            Figure(BENCH, f"{workers} worker(s) achieved / theoretical", rate / r["best"],
                   ".2f", "", None),
            Figure(BENCH, f"{workers} worker(s) coordinator CPU share", share, ".1%", "", None),
            Figure(BENCH, f"{workers} worker(s) one coordinator's ceiling, img/s",
                   rate / max(share, 1e-9), ",.0f", "", None),
            Figure(BENCH, f"{workers} worker(s) coordinator CPU per image, us",
                   r["cpu"] / n * 1e6, ".0f", "", None),
            Figure(BENCH, f"{workers} worker(s) coordinator CPU per further image, us",
                   r["further"] * 1e6, ".0f", "", None),
        ]
    per_image = statistics.median(r["cpu"] / n * 1e6 for r in results.values())
    figures.append(Figure(BENCH, "coordinator CPU per image, us (median of the worker counts)",
                          per_image, ".0f", f"<= {GOAL_US_PER_IMAGE}",
                          per_image <= GOAL_US_PER_IMAGE))
    figures.append(Figure(BENCH, "coordinator CPU per further image, us (median)",
                          statistics.median(r["further"] * 1e6 for r in results.values()),
                          ".0f", "", None))
    return figures


def _run_child(warm_up: Path, small: Path, job: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_dask", "--child", str(warm_up), str(small),
           str(job)]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                         check=False, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"dask: the coordinator failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(workers: int, concurrency: int, n: int, small: int, r: dict[str, Any]) -> None:
    rate = n / r["wall"]
    print(f"\n{workers} worker(s), concurrency {concurrency}: {n:,} images in {r['wall']:.2f} s "
          f"({r['requests']} requests) = {rate:,.0f} img/s; theoretical best {r['best']:,.0f} "
          f"img/s -> {rate / r['best']:.2f}")
    print(f"  coordinator CPU {r['cpu']:.2f} s = {r['cpu'] / r['wall']:.1%} of one core "
          f"({r['cpu'] / n * 1e6:.0f} us per image); a run of {small} images "
          f"{r['small_cpu'] * 1e3:.0f} ms: {r['further'] * 1e6:.0f} us per further image")


# --- the child: the coordinator alone in its process --------------------------------------------


def _child(warm_up: str, small_file: str, job_file: str) -> dict[str, Any]:
    """Run the warm-up job (the workers import and connect), then the small and the measured
    one."""
    from runner.executors import run_job
    from runner.job import load_job

    run_job(load_job(warm_up))
    small = load_job(small_file)
    cpu = cpu_seconds()
    small_summary = run_job(small)
    small_cpu = cpu_seconds() - cpu
    if small_summary.done != small_summary.listed:
        raise SystemExit(f"dask: the small run left images undone: {small_summary.status}")
    job = load_job(job_file)
    cpu = cpu_seconds()
    started = time.perf_counter()
    summary = run_job(job)
    wall = time.perf_counter() - started
    return {"wall": wall, "cpu": cpu_seconds() - cpu, "done": summary.done,
            "status": summary.status, "requests": summary.requests, "small_cpu": small_cpu}


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    raise SystemExit(main())
