"""Benchmark: images per second through `run_job` against the emulator, as a share of the API's limit.

    python -m bench.bench_pipeline [--images 5000] [--latency-ms 100]

With `concurrency` requests in flight, `batch_size` images each and `latency` per request, no
client can beat concurrency x batch_size / latency images per second: that is the baseline.
Goals: 0.9 of it at concurrency 8, 0.8 at concurrency 32, and SQLite under 5% of the wall time.
The store's share is measured by timing every `Store` method called during the run (sum of the
time inside them, over all threads, divided by the wall time); preparation likewise for
`prepare_item`, which runs on a pool so that its share may exceed 100%.

A second baseline, a bare client (prebuilt bodies, one requests.Session per thread, nothing
else), shows what this emulator and this machine allow at all: the emulator runs in this
process and spends CPU on every request, which the real API spends on its own machines.
What measures only the emulator is set aside (`fixtures.lean_emulator`): Nagle's delay on its
sockets and its pixel analysis (`--emulator-analysis` keeps the analysis).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fixtures import (
    Figure,
    all_met,
    cpu_seconds,
    lean_emulator,
    print_figures,
    set_bench_token,
    write_job,
    write_tiny_jpegs,
)

BENCH = "pipeline"
BATCH = 10
RUNS = ((8, 0.9), (32, 0.8))  # (concurrency, goal as a share of the theoretical best)
STORE_GOAL = 0.05


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = run(args)
    print_figures(figures, "\npipeline figures")
    return 0 if all_met(figures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="images to send (default 5000)")
    parser.add_argument("--latency-ms", type=float, default=100.0,
                        help="the emulator's latency per request (default 100)")
    parser.add_argument("--emulator-analysis", action="store_true",
                        help="keep the emulator's pixel analysis of every record (CPU here)")
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    from runner.job import SandboxSettings
    from runner.sandbox import Sandbox

    n, latency_s = args.images, args.latency_ms / 1000
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-"))
    token, restore_token = set_bench_token()
    figures: list[Figure] = []
    try:
        seconds = write_tiny_jpegs(tmp / "images", n)
        write_tiny_jpegs(tmp / "warm-up", 100, seed=1)
        print(f"pipeline: {n:,} distinct 64x48 JPEGs written in {seconds:.1f} s; emulator latency "
              f"{args.latency_ms:.0f} ms, batch {BATCH}")
        settings = SandboxSettings(latency_ms=args.latency_ms, token=token,
                                   credits=10**12, max_records=BATCH)
        with lean_emulator(args.emulator_analysis), Sandbox(settings) as sb:
            # Imports, thread pools, the first connections: paid once, outside the measurement.
            _measured_run(tmp, "warm-up", tmp / "warm-up", sb.endpoint_url(), 8)
            for concurrency, goal in RUNS:
                bare = _bare_client(tmp / "images", n, sb.endpoint_url(), token, concurrency)
                m = _measured_run(tmp, f"c{concurrency}", tmp / "images", sb.endpoint_url(),
                                  concurrency)
                if m.done != n:
                    raise SystemExit(f"pipeline: {m.done} of {n} images done at concurrency "
                                     f"{concurrency}: {m.status}")
                best = concurrency * BATCH / latency_s
                achieved = n / m.wall
                _report(concurrency, n, best, m, n / bare)
                figures += [
                    Figure(BENCH, f"c={concurrency} achieved / theoretical", achieved / best,
                           ".2f", f">= {goal:.2f}", achieved / best >= goal),
                    Figure(BENCH, f"c={concurrency} bare client / theoretical",
                           n / bare / best, ".2f", "", None),
                    Figure(BENCH, f"c={concurrency} SQLite share of wall", m.store_s / m.wall,
                           ".1%", f"< {STORE_GOAL:.0%}", m.store_s / m.wall < STORE_GOAL),
                    Figure(BENCH, f"c={concurrency} SQLite CPU share of wall (no lock waits)",
                           m.store_cpu_s / m.wall, ".1%", "", None),
                    Figure(BENCH, f"c={concurrency} preparation, thread-s per wall s",
                           m.prep_s / m.wall, ".1%", "", None),
                ]
    finally:
        restore_token()
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


# --- one run, with the store and the preparation timed ------------------------------------------


@dataclass
class Measured:
    wall: float = 0.0
    cpu: float = 0.0
    done: int = 0
    status: str = ""
    requests: int = 0
    store_s: float = 0.0
    store_cpu_s: float = 0.0  # CPU time of the calling threads inside the store (no lock waits)
    store_busy_s: float = 0.0  # wall time during which at least one thread was inside the store
    store_calls: dict[str, list[float]] = field(default_factory=dict)  # name -> [calls, seconds]
    prep_s: float = 0.0
    prep_calls: int = 0


def _measured_run(tmp: Path, name: str, images: Path, endpoint: str, concurrency: int) -> Measured:
    from runner.job import load_job
    from runner.pipeline import run_job

    job = load_job(write_job(tmp, name=name, images=images, endpoint=endpoint,
                             concurrency=concurrency, batch_size=BATCH, db=f"{name}.db"))
    m = Measured()
    with _timed_store(m), _timed_preparation(m):
        cpu = cpu_seconds()
        started = time.perf_counter()
        summary = run_job(job)
        m.wall = time.perf_counter() - started
        m.cpu = cpu_seconds() - cpu
    m.done, m.status, m.requests = summary.done, summary.status, summary.requests
    return m


@contextlib.contextmanager
def _timed_store(m: Measured) -> Iterator[None]:
    """Wrap every public Store method (and its constructor) in a timer for the duration."""
    from runner.store import Store

    depth = threading.local()
    lock = threading.Lock()
    spans: list[tuple[float, float]] = []

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            level = getattr(depth, "n", 0)
            if level:  # a store method calling another: counted once, by the outer one
                return fn(*args, **kwargs)
            depth.n = 1
            cpu, started = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                depth.n = 0
                with lock:
                    spans.append((started, ended))
                    m.store_cpu_s += time.thread_time() - cpu
                    calls = m.store_calls.setdefault(name, [0, 0.0])
                    calls[0] += 1
                    calls[1] += ended - started

        return wrapper

    names = [k for k, v in vars(Store).items()
             if callable(v) and (not k.startswith("_") or k in ("__init__", "__exit__"))]
    originals = {k: vars(Store)[k] for k in names}
    for k, fn in originals.items():
        setattr(Store, k, timed(k, fn))
    try:
        yield
    finally:
        for k, fn in originals.items():
            setattr(Store, k, fn)
        m.store_s = sum(e - s for s, e in spans)
        m.store_busy_s = _union(spans)


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


@contextlib.contextmanager
def _timed_preparation(m: Measured) -> Iterator[None]:
    from runner import pipeline

    original = pipeline.prepare_item
    lock = threading.Lock()

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent = time.perf_counter() - started
            with lock:
                m.prep_s += spent
                m.prep_calls += 1

    pipeline.prepare_item = timed
    try:
        yield
    finally:
        pipeline.prepare_item = original


def _bare_client(images: Path, n: int, endpoint: str, token: str, concurrency: int) -> float:
    """Seconds for the least a client must do: the same images, bodies built beforehand."""
    import base64
    import json
    from concurrent.futures import ThreadPoolExecutor

    import requests

    files = sorted(images.rglob("*.jpg"))[:n]
    bodies = []
    for i in range(0, len(files), BATCH):
        records = [{"_id": str(p), "_base64": base64.b64encode(p.read_bytes()).decode("ascii")}
                   for p in files[i:i + BATCH]]
        bodies.append(json.dumps({"records": records}).encode())
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    local = threading.local()

    def post(body: bytes) -> int:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        resp = session.post(endpoint, data=body, headers=headers, timeout=60)
        return len(resp.json()["records"])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answered = sum(pool.map(post, bodies))
    seconds = time.perf_counter() - started
    if answered != n:
        raise SystemExit(f"pipeline: the bare client got {answered} answers for {n} images")
    return seconds


def _report(concurrency: int, n: int, best: float, m: Measured, bare: float) -> None:
    achieved = n / m.wall
    print(f"\nconcurrency {concurrency}, batch {BATCH}: {n:,} images in {m.wall:.2f} s "
          f"({m.requests} requests) = {achieved:,.0f} img/s; theoretical best {best:,.0f} img/s "
          f"-> {achieved / best:.2f}; bare client {bare:,.0f} img/s -> {bare / best:.2f} "
          f"(ximrun / bare {achieved / bare:.2f})")
    print(f"  process CPU {m.cpu:.2f} s = {m.cpu / m.wall:.2f} cores busy on average "
          f"({os.cpu_count()} here; the emulator shares this process)")
    print(f"  SQLite: {m.store_s:.3f} s inside Store methods = {m.store_s / m.wall:.1%} of wall "
          f"(CPU inside them {m.store_cpu_s / m.wall:.1%}; store busy {m.store_busy_s / m.wall:.1%}"
          " of wall: time with a call in progress)")
    top = sorted(m.store_calls.items(), key=lambda kv: -kv[1][1])[:5]
    print("    " + ", ".join(f"{k} {c:.0f}x {s * 1000:.0f} ms" for k, (c, s) in top))
    per = m.prep_s / max(m.prep_calls, 1) * 1e6
    print(f"  preparation: {m.prep_s:.2f} thread-s over {m.prep_calls:,} images "
          f"({per:.0f} us each) = {m.prep_s / m.wall:.1%} of wall (on a pool)")


if __name__ == "__main__":
    raise SystemExit(main())
