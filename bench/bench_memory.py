"""Benchmark: the resident memory of a full run, sampled as it goes; it must stay flat.

    python -m bench.bench_memory [--images 100000]

The run (`run_job` over N distinct small JPEGs, concurrency 8, batch 10) happens in a child
process and the emulator (latency 0) in this one, so that the emulator's ledger, which keeps
one entry per record ever sent, is not counted as ximrun's (its pixel analysis and Nagle's
delay are set aside, as in bench_pipeline, so that the run is not paced by the emulator). A thread of the child reads VmRSS
every 0.5 s next to the run's progress; RSS is reported at every 10,000 images settled. The
baseline is the child's own RSS at 10,000 images: the goal is growth after it under 1 MB per
10,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.fixtures import (
    REPO,
    TOKEN_ENV,
    Figure,
    all_met,
    child_env,
    lean_emulator,
    peak_kb,
    print_figures,
    status_kb,
    write_job,
    write_tiny_jpegs,
)

BENCH = "memory"
STEP = 10_000
SAMPLE_S = 0.5
GROWTH_GOAL_MB = 1.0  # per STEP images, after the first STEP


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(Path(args.child))))
        return 0
    figures = run(args)
    print_figures(figures, "\nmemory figures")
    return 0 if all_met(figures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="images (default 100000)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    from runner.job import SandboxSettings
    from runner.sandbox import Sandbox

    n = args.images
    if n < 2 * STEP:
        raise SystemExit(f"memory: give at least {2 * STEP:,} images")
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-"))
    token = secrets.token_hex(8)
    try:
        seconds = write_tiny_jpegs(tmp / "images", n)
        print(f"memory: {n:,} distinct 64x48 JPEGs written in {seconds:.1f} s")
        settings = SandboxSettings(token=token, credits=10**12)
        with lean_emulator(analysis=False), Sandbox(settings) as sb:
            job_path = write_job(tmp, name="memory", images=tmp / "images",
                                 endpoint=sb.endpoint_url())
            cmd = [sys.executable, "-m", "bench.bench_memory", "--child", str(job_path)]
            out = subprocess.run(cmd, cwd=REPO, env={**child_env(), TOKEN_ENV: token},
                                 capture_output=True, text=True, check=False, timeout=7200)
        if out.returncode != 0:
            raise SystemExit(f"memory: the run failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if r["done"] != n:
        raise SystemExit(f"memory: {r['done']:,} of {n:,} images done ({r['status']})")
    marks = _marks(r["samples"], n)
    print(f"\n{n:,} images in {r['seconds']:.1f} s ({n / r['seconds']:,.0f} img/s), "
          f"peak {r['peak_kb'] / 1024:.1f} MB")
    print(f"{'settled':>10}{'RSS MB':>9}")
    for settled, kb in marks:
        print(f"{settled:>10,}{kb / 1024:>9.1f}")
    base = marks[0][1]
    growth = (marks[-1][1] - base) / 1024 / ((marks[-1][0] - marks[0][0]) / STEP)
    print(f"growth after the first {STEP:,}: {(marks[-1][1] - base) / 1024:+.1f} MB in total, "
          f"{growth:+.2f} MB per {STEP:,} images")
    return [
        Figure(BENCH, f"RSS growth per {STEP:,} images, MB", growth, "+.2f",
               f"< {GROWTH_GOAL_MB:.0f} MB", growth < GROWTH_GOAL_MB),
        Figure(BENCH, f"RSS at end / RSS at {STEP:,}", marks[-1][1] / base, ".2f", "", None),
        Figure(BENCH, f"peak memory of {n:,} images, MB", r["peak_kb"] / 1024, ".0f", "", None),
    ]


def _marks(samples: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """(settled, RSS kB) at the first sample at or past every STEP images, and at the end."""
    out: list[tuple[int, int]] = []
    goal = STEP
    for settled, kb in samples:
        while settled >= goal and goal <= n:
            out.append((goal, kb))
            goal += STEP
    return out


def _child(job_path: Path) -> dict[str, Any]:
    from runner.executors import run_job
    from runner.job import load_job
    from runner.summary import Summary

    job = load_job(job_path)
    settled = 0
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def progress(s: Summary) -> None:
        nonlocal settled
        settled = s.done + s.failed + s.rejected

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            samples.append((settled, status_kb("VmRSS") or 0))

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        summary = run_job(job, progress=progress)
    finally:
        stop.set()
        sampler.join()
    samples.append((summary.done + summary.failed + summary.rejected, status_kb("VmRSS") or 0))
    return {"done": summary.done, "status": summary.status, "samples": samples,
            "seconds": time.perf_counter() - started, "peak_kb": peak_kb(), "pid": os.getpid()}


if __name__ == "__main__":
    raise SystemExit(main())
