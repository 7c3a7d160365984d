"""Benchmark: `ximrun report` on a big job builds in seconds and in flat memory.

    python -m bench.bench_report [--images 100000] [--sample 300]

A state database of N images is written directly (no API): 95 % done with an answer like the
emulator's (a box, a best match), 3 % failed (three API reasons, and `not_found` for files gone
since), 2 % rejected (three reasons); 50 runs. The images point at a pool of 500 real 240x336
JPEGs, so every thumbnail is really read and decoded. The report is built twice, each time in a
fresh child process: for N/10 images and for N. What a report costs is mostly its thumbnails,
and those are capped (the sample, the first 200 per reason; the other failures are a streamed
list of keys), so the goals are ratios of the two builds: the time per thumbnail at N under 2x
the one at N/10 (the reads of SQLite, which do grow with N, stay a small part), and the peak
memory at N under 1.25x the peak at N/10 (flat: rows are streamed from SQLite, thumbnails made
a chunk at a time).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import REPO, Figure, all_met, child_env, peak_kb, print_figures, status_kb

BENCH = "report"
POOL = 500
TIME_GOAL = 2.0  # seconds per thumbnail at N / at N/10
MEMORY_GOAL = 1.25  # peak(N) / peak(N/10)
FAILED = ("api 400: Unable to load image", "http 500: Internal server error",
          "api 422: Invalid record")
REJECTED = ("unsupported_format:avif", "truncated", "corrupt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(Path(args.child), args.sample)))
        return 0
    figures = run(args)
    print_figures(figures, "\nreport figures")
    return 0 if all_met(figures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_report", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="images (default 100000)")
    parser.add_argument("--sample", type=int, default=300, help="done images shown (300)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    n = args.images
    if n < 1000:
        raise SystemExit("report: give at least 1,000 images")
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-"))
    try:
        pool = _write_pool(tmp / "pool")
        results = {}
        for size in (n // 10, n):
            started = time.perf_counter()
            job = _write_job_db(tmp / f"n{size}", size, pool)
            print(f"report: a state database of {size:,} images written in "
                  f"{time.perf_counter() - started:.1f} s")
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_report", "--child", str(job),
                 "--sample", str(args.sample)],
                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=3600,
                check=False)
            if out.returncode != 0:
                raise SystemExit(f"report: the build failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[size] = r
            print(f"report: {size:,} images: {r['seconds']:.2f} s, peak {r['peak_kb'] / 1024:.1f}"
                  f" MB (after imports {r['base_kb'] / 1024:.1f} MB), {r['mb']:.1f} MB of HTML, "
                  f"{r['thumbnails']} thumbnails, {r['placeholders']} placeholders, "
                  f"{r['listed']:,} failures listed by key")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    small, big = results[n // 10], results[n]
    def per_thumb(r: dict[str, Any]) -> float:
        return r["seconds"] / max(r["thumbnails"] + r["placeholders"], 1)

    t_ratio = per_thumb(big) / per_thumb(small)
    m_ratio = big["peak_kb"] / small["peak_kb"]
    return [
        Figure(BENCH, f"time per thumbnail at {n:,} / at {n // 10:,} images", t_ratio, ".2f",
               f"< {TIME_GOAL:.0f}", t_ratio < TIME_GOAL),
        Figure(BENCH, f"peak memory at {n:,} / at {n // 10:,} images", m_ratio, ".2f",
               f"< {MEMORY_GOAL}", m_ratio < MEMORY_GOAL),
        Figure(BENCH, f"build time at {n:,} images, s", big["seconds"], ".1f", "", None),
        Figure(BENCH, f"peak memory at {n:,} images, MB", big["peak_kb"] / 1024, ".0f", "",
               None),
    ]


def _write_pool(folder: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    rng = random.Random(7)
    paths = []
    for i in range(POOL):
        im = Image.new("RGB", (240, 336), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.randrange(200), rng.randrange(300)
            d.ellipse((x, y, x + 40, y + 40), fill=tuple(rng.randrange(256) for _ in range(3)))
        p = folder / f"card{i:04d}.jpg"
        im.save(p, "JPEG", quality=85)
        paths.append(p)
    return paths


def _write_job_db(folder: Path, n: int, pool: list[Path]) -> Path:
    from runner.schema import create_schema

    folder.mkdir(parents=True)
    db = folder / "state.db"
    job = folder / "big.toml"
    job.write_text(f'name = "big"\n[source]\npaths = ["{pool[0].parent.as_posix()}/"]\n'
                   f'[state]\ndb = "{db.as_posix()}"\n', encoding="utf-8")
    rng = random.Random(n)
    conn = sqlite3.connect(db)
    create_schema(conn)
    now = "2026-12-01T00:00:00.000Z"

    def rows() -> Any:
        for i in range(n):
            uri = str(pool[i % POOL])
            key = f"s3://cards/2026/{i // 1000:04d}/{i:08d}.jpg"
            roll = rng.random()
            if roll < 0.95:
                x1, y1 = rng.randrange(20), rng.randrange(20)
                record = {"_id": key, "_status": {"code": 200, "text": "OK"}, "_width": 240,
                          "_height": 336, "_objects": [{
                              "name": "Card", "bound_box": [x1, y1, 220 + x1, 310 + y1],
                              "prob": 0.97, "_identification": {"best_match": {
                                  "name": f"Card {i % 977}", "set_code": "SBX",
                                  "card_number": str(i % 300)}}}]}
                yield (key, uri, "done", None, 10, json.dumps(record), now)
            elif roll < 0.98:
                if rng.random() < 0.2:  # the file is gone since: a placeholder
                    uri = f"{pool[0].parent}/gone-{i}.jpg"
                    reason = f"not_found: {uri}"
                else:
                    reason = FAILED[rng.randrange(len(FAILED))]
                yield (key, uri, "failed", reason, 0, None, None)
            else:
                yield (key, uri, "rejected", REJECTED[rng.randrange(len(REJECTED))], 0, None,
                       None)

    with conn:
        conn.executemany(
            "INSERT INTO items (job, key, uri, size, fingerprint, state, reason, credits, "
            "result, answered_at, first_seen, updated_at) "
            "VALUES ('big', ?, ?, 1, 'fp', ?, ?, ?, ?, ?, '" + now + "', '" + now + "')",
            rows())
        conn.executemany(
            "INSERT INTO runs (job, pid, started_at, finished_at, status, exit_code, listed, "
            "sent, done, failed, rejected, reused, requests, credits) VALUES ('big', 1, ?, ?, "
            "'finished', 0, ?, ?, ?, 0, 0, 0, ?, ?)",
            [(now, now, n, n // 50, n // 50, n // 500, n // 5) for _ in range(50)])
    conn.close()
    return job


def _child(job_path: Path, sample: int) -> dict[str, Any]:
    from runner.html_report import write_report
    from runner.job import load_job

    job = load_job(job_path, require_token=False)
    base = status_kb("VmRSS") or 0
    started = time.perf_counter()
    stats = write_report(job, job_path.parent / "report.html", sample=sample)
    return {"seconds": time.perf_counter() - started, "peak_kb": peak_kb(), "base_kb": base,
            "mb": stats.bytes / 1e6, "thumbnails": stats.thumbnails,
            "placeholders": stats.placeholders, "listed": stats.listed_without_thumbnail}


if __name__ == "__main__":
    raise SystemExit(main())
