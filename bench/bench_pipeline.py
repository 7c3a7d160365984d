"""Benchmark: images per second through `run_job` against the emulator, as a share of the API's limit.

    python -m bench.bench_pipeline [--images 5000] [--latency-ms 100]

With `concurrency` requests in flight, `batch_size` images each and `latency` per request, no
client can beat concurrency x batch_size / latency images per second: that is the baseline.
Goals: 0.9 of it at concurrency 8, 0.8 at concurrency 32, and SQLite under 5% of the wall time
at concurrency 8. At concurrency 32, CPU per image: at most 180 us in the run's own process, at
most 550 us in all of ximrun's processes together (the run and its preparation workers, read as
the CPU of the children it waited for), and 0.85 of the bare client's throughput.

The wall time is set by the API's request slots: `concurrency` of them, each busy for a latency
per request. SQLite's share of it is the slot time spent waiting for a commit: a request's
attempt row is committed after it takes its slot and before it leaves (`Store.stats`, the
`record_attempt` waits), over concurrency x wall. Answers are committed after the slot is
handed back, so they lengthen no request. Also reported: the writer thread's CPU time and its
wall time inside transactions (which includes waits for the interpreter lock), over the wall
time. Preparation on the run's threads (the first images of a run, and those taken up while
the workers start) is timed around `prepare_items`, on a pool, so its share may exceed 100%.

A second baseline, a bare client (prebuilt bodies, urllib3's pool as ximrun uses it, nothing
else), shows what this emulator and this machine allow at all: the emulator runs in a process
of its own (bench/emulator.py), as the API runs on machines of its own, but on the same two
cores, spending CPU on every request. What measures only the emulator is set aside
(`fixtures.lean_emulator`): Nagle's delay on its sockets and its pixel analysis
(`--emulator-analysis` keeps the analysis).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fixtures import (
    Figure,
    ThreadCPU,
    all_met,
    cpu_seconds,
    emulator_process,
    print_figures,
    set_bench_token,
    write_job,
    write_tiny_jpegs,
)

BENCH = "pipeline"
BATCH = 10
RUNS = ((8, 0.9), (32, 0.8))  # (concurrency, goal as a share of the theoretical best)
STORE_GOAL = 0.05  # at concurrency 8, the run; at 32 the figure says how the lock is shared
# At concurrency 32 (bench/README.md, "CPU per image"): the run's own process, and ximrun's
# processes together (the run and its preparation workers), in microseconds of CPU per image;
# and the throughput against the bare client's in the same run.
CPU_GOAL_US = 180.0
ALL_CPU_GOAL_US = 550.0  # what the run process alone spent before preparation left it
BARE_GOAL = 0.85


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per concurrency, each the bare client and ximrun in turn; "
                             "every figure is the median over them (default 3)")
    parser.add_argument("--emulator-analysis", action="store_true",
                        help="keep the emulator's pixel analysis of every record (CPU here)")
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    n, latency_s = args.images, args.latency_ms / 1000
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-"))
    token, restore_token = set_bench_token()
    figures: list[Figure] = []
    try:
        seconds = write_tiny_jpegs(tmp / "images", n)
        write_tiny_jpegs(tmp / "warm-up", 100, seed=1)
        print(f"pipeline: {n:,} distinct 64x48 JPEGs written in {seconds:.1f} s; emulator latency "
              f"{args.latency_ms:.0f} ms, batch {BATCH}; {args.rounds} round(s) per concurrency, "
              "the bare client and ximrun in turn")
        with emulator_process(latency_ms=args.latency_ms, token=token,
                              analysis=args.emulator_analysis, max_records=BATCH) as endpoint:
            # Imports, thread pools, the first connections: paid once, outside the measurement.
            _measured_run(tmp, "warm-up", tmp / "warm-up", endpoint, 8)
            for concurrency, goal in RUNS:
                best = concurrency * BATCH / latency_s
                rounds = [_round(tmp, n, endpoint, token, concurrency, r, best)
                          for r in range(args.rounds)]
                figures += _figures(concurrency, goal, n, best, rounds)
    finally:
        restore_token()
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


@dataclass
class Round:
    m: Measured
    bare_s: float  # the bare client's wall time for the same images
    bare_cpu: float


def _round(tmp: Path, n: int, endpoint: str, token: str, concurrency: int, r: int,
           best: float) -> Round:
    """The bare client and ximrun, one after the other, first one then the other in turn: a
    burst of load from elsewhere lands on one round's pair, not on one of the two."""
    def bare() -> tuple[float, float]:
        return _bare_client(tmp / "images", n, endpoint, token, concurrency)

    def ximrun() -> Measured:
        return _measured_run(tmp, f"c{concurrency}r{r}", tmp / "images", endpoint, concurrency)

    if r % 2 == 0:
        (bare_s, bare_cpu), m = bare(), ximrun()
    else:
        m = ximrun()
        bare_s, bare_cpu = bare()
    if m.done != n:
        raise SystemExit(f"pipeline: {m.done} of {n} images done at concurrency "
                         f"{concurrency}: {m.status}")
    _report(concurrency, n, best, m, n / bare_s, bare_cpu, f" (round {r + 1})")
    return Round(m, bare_s, bare_cpu)


def _figures(concurrency: int, goal: float, n: int, best: float, rounds: list[Round]
             ) -> list[Figure]:
    """Each figure is the median over the rounds (of each round's ratio, for a ratio)."""
    def med(f: Callable[[Round], float]) -> float:
        return statistics.median(f(r) for r in rounds)

    achieved = med(lambda r: n / r.m.wall / best)
    share = med(lambda r: r.m.slot_wait() / (concurrency * r.m.wall))
    c = f"c={concurrency}"
    figures = [
        Figure(BENCH, f"{c} achieved / theoretical", achieved, ".2f", f">= {goal:.2f}",
               achieved >= goal),
        Figure(BENCH, f"{c} bare client / theoretical", med(lambda r: n / r.bare_s / best),
               ".2f", "", None),
        Figure(BENCH, f"{c} SQLite share of wall (slots waiting)", share, ".1%",
               f"< {STORE_GOAL:.0%}" if concurrency == 8 else "",
               share < STORE_GOAL if concurrency == 8 else None),
        Figure(BENCH, f"{c} store writer CPU / wall", med(lambda r: r.m.write_cpu_s / r.m.wall),
               ".1%", "", None),
        Figure(BENCH, f"{c} store writer in transactions / wall",
               med(lambda r: r.m.write_s / r.m.wall), ".1%", "", None),
        Figure(BENCH, f"{c} preparation, thread-s per wall s",
               med(lambda r: r.m.prep_s / r.m.wall), ".1%", "", None),
    ]
    if concurrency == 32:
        own = med(lambda r: r.m.cpu / n * 1e6)
        every = med(lambda r: (r.m.cpu + r.m.workers_cpu) / n * 1e6)
        ratio = med(lambda r: r.bare_s / r.m.wall)
        figures += [
            Figure(BENCH, "c=32 run process CPU per image, us", own, ".0f",
                   f"<= {CPU_GOAL_US:.0f}", own <= CPU_GOAL_US),
            Figure(BENCH, "c=32 all ximrun processes CPU per image, us", every, ".0f",
                   f"<= {ALL_CPU_GOAL_US:.0f}", every <= ALL_CPU_GOAL_US),
            Figure(BENCH, "c=32 bare client CPU per image, us",
                   med(lambda r: r.bare_cpu / n * 1e6), ".0f", "", None),
            Figure(BENCH, "c=32 achieved / bare client", ratio, ".2f", f">= {BARE_GOAL:.2f}",
                   ratio >= BARE_GOAL),
        ]
    return figures


# --- one run, with the store and the preparation timed ------------------------------------------


@dataclass
class Measured:
    wall: float = 0.0
    cpu: float = 0.0  # the run's own process
    workers_cpu: float = 0.0  # its preparation's worker processes
    done: int = 0
    status: str = ""
    requests: int = 0
    write_s: float = 0.0  # the store's writer inside transactions (one thread)
    write_cpu_s: float = 0.0  # its CPU time there: SQLite's work without interpreter-lock waits
    read_s: float = 0.0  # the coordinator's reads (classification, answers to reuse)
    transactions: int = 0
    writes: int = 0
    waits: dict[str, list[float]] = field(default_factory=dict)  # name -> [calls, seconds]
    prep_s: float = 0.0
    prep_calls: int = 0
    threads: dict[str, float] = field(default_factory=dict)  # CPU seconds by kind of thread
    sampling_cpu: float = 0.0  # what reading them cost, left out of `cpu`

    def slot_wait(self) -> float:
        """Seconds request slots spent waiting for attempt rows to be committed."""
        return self.waits.get("record_attempt", [0, 0.0])[1]


def _measured_run(tmp: Path, name: str, images: Path, endpoint: str, concurrency: int) -> Measured:
    from runner.executors import run_job
    from runner.job import load_job
    from runner.store import Store

    job = load_job(write_job(tmp, name=name, images=images, endpoint=endpoint,
                             concurrency=concurrency, batch_size=BATCH, db=f"{name}.db"))
    m = Measured()
    with Store(job.db_path) as store, _timed_preparation(m):
        cpu, children = cpu_seconds(), cpu_seconds("children")
        started = time.perf_counter()
        with ThreadCPU() as threads:
            summary = run_job(job, store=store)  # its commit statistics are read below
        m.wall = time.perf_counter() - started
        # The per-thread readings are the benchmark's work, not the run's: left out.
        m.sampling_cpu = threads.own_s
        m.cpu = cpu_seconds() - cpu - m.sampling_cpu
        m.workers_cpu = cpu_seconds("children") - children
    m.threads = threads.by_name()
    st = store.stats
    m.write_s, m.write_cpu_s, m.read_s = st.write_s, st.write_cpu_s, st.read_s
    m.transactions, m.writes = st.transactions, st.writes
    m.waits = {name: [calls, seconds] for name, (calls, seconds) in st.waits.items()}
    m.done, m.status, m.requests = summary.done, summary.status, summary.requests
    return m


@contextlib.contextmanager
def _timed_preparation(m: Measured) -> Iterator[None]:
    from runner.executors import preparers

    original = preparers.prepare_items
    lock = threading.Lock()

    @functools.wraps(original)
    def timed(job: Any, items: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(job, items)
        finally:
            spent = time.perf_counter() - started
            with lock:
                m.prep_s += spent
                m.prep_calls += len(items)

    preparers.prepare_items = timed
    try:
        yield
    finally:
        preparers.prepare_items = original


def _bare_client(images: Path, n: int, endpoint: str, token: str, concurrency: int
                 ) -> tuple[float, float]:
    """Seconds for the least a client must do (the same images, bodies built beforehand), and
    the CPU seconds it spent doing it."""
    import base64
    import json
    from concurrent.futures import ThreadPoolExecutor

    import urllib3

    files = sorted(images.rglob("*.jpg"))[:n]
    bodies = []
    for i in range(0, len(files), BATCH):
        records = [{"_id": str(p), "_base64": base64.b64encode(p.read_bytes()).decode("ascii")}
                   for p in files[i:i + BATCH]]
        bodies.append(json.dumps({"records": records}).encode())
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    http = urllib3.PoolManager(maxsize=concurrency, retries=False, timeout=60.0)

    def post(body: bytes) -> int:
        resp = http.urlopen("POST", endpoint, body=body, headers=headers, redirect=False)
        return len(json.loads(resp.data)["records"])

    cpu = cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answered = sum(pool.map(post, bodies))
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    http.clear()  # its connections closed now, not whenever the collector gets to them
    if answered != n:
        raise SystemExit(f"pipeline: the bare client got {answered} answers for {n} images")
    return seconds, cpu


def _report(concurrency: int, n: int, best: float, m: Measured, bare: float,
            bare_cpu: float, label: str = "") -> None:
    achieved = n / m.wall
    print(f"\nconcurrency {concurrency}{label}, batch {BATCH}: {n:,} images in {m.wall:.2f} s "
          f"({m.requests} requests) = {achieved:,.0f} img/s; theoretical best {best:,.0f} img/s "
          f"-> {achieved / best:.2f}; bare client {bare:,.0f} img/s -> {bare / best:.2f} "
          f"(ximrun / bare {achieved / bare:.2f})")
    print(f"  process CPU {m.cpu:.2f} s = {m.cpu / m.wall:.2f} cores busy on average "
          f"({os.cpu_count()} here, shared with the emulator's process); per image: the run "
          f"{m.cpu / n * 1e6:.0f} us, its preparation workers {m.workers_cpu / n * 1e6:.0f} us, "
          f"the bare client {bare_cpu / n * 1e6:.0f} us")
    print(f"  SQLite: writer {m.write_s:.3f} s in {m.transactions} transactions for {m.writes} "
          f"writes (its CPU {m.write_cpu_s:.3f} s), coordinator's reads {m.read_s:.3f} s")
    waits = ", ".join(f"{k} {c:.0f}x {s / max(c, 1) * 1000:.1f} ms" for k, (c, s) in m.waits.items())
    print(f"    a request's thread waits for its commits: {waits}; request slots waited "
          f"{m.slot_wait():.2f} s of {concurrency} x {m.wall:.2f} s = "
          f"{m.slot_wait() / (concurrency * m.wall):.1%}")
    kinds = ", ".join(f"{k} {s / n * 1e6:.0f}" for k, s in m.threads.items() if s / n >= 5e-7)
    print(f"  the run process's threads, CPU per image in us (all of a kind together): {kinds}; "
          f"reading them cost {m.sampling_cpu * 1e3:.0f} ms, left out of the run's figure")
    per = m.prep_s / max(m.prep_calls, 1) * 1e6
    print(f"  preparation: {m.prep_s:.2f} thread-s over {m.prep_calls:,} images "
          f"({per:.0f} us each) = {m.prep_s / m.wall:.1%} of wall (on a pool)")


if __name__ == "__main__":
    raise SystemExit(main())
