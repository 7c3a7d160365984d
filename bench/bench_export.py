"""Benchmark: `ximrun export` of a large catalog streams (flat memory), in every format.

    python -m bench.bench_export [--rows 1000000] [--formats csv,jsonl,parquet]

A state database of N done catalog rows (three manifest columns and an analysis record each,
written straight through the store's schema) is exported by a child process per format, with a
`--field`, to a local file. Figures: each export's peak RSS (goal < 200 MB whatever N) and its
rows per second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import REPO, Figure, all_met, child_env, peak_kb, print_figures

BENCH = "export"
MEMORY_GOAL_MB = 200.0
INSERT_CHUNK = 50_000
FIELD = "best=_objects.0._identification.best_match.name"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.job))))
        return 0
    figures = run(args)
    print_figures(figures, "\nexport figures")
    return 0 if all_met(figures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_export", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="done rows (default 1000000)")
    parser.add_argument("--formats", default="csv,jsonl,parquet",
                        help="formats to export, comma-separated (parquet needs pyarrow)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    n = args.rows
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-export-"))
    figures: list[Figure] = []
    try:
        job = tmp / "export.toml"
        job.write_text('name = "export"\n[source]\nmanifest = "catalog.csv"\n'
                       '[api]\nendpoint = "sandbox"\n[state]\ndb = "state.db"\n')
        seconds = _fill_database(job, n)
        size = (tmp / "state.db").stat().st_size / 1e6
        print(f"export: {n:,} done rows written in {seconds:.1f} s ({size:.0f} MB database)")
        for fmt in args.formats.split(","):
            r = _run_child(fmt, job)
            if r["rows"] != n:
                raise SystemExit(f"export: {fmt} wrote {r['rows']:,} rows, expected {n:,}")
            peak = r["peak_kb"] / 1024
            print(f"export {fmt}: {r['seconds']:.1f} s, {n / r['seconds']:,.0f} rows/s, "
                  f"{r['bytes'] / 1e6:.0f} MB written, peak memory {peak:.0f} MB")
            figures += [
                Figure(BENCH, f"{fmt} peak memory, MB ({n:,} rows)", peak, ".0f",
                       f"< {MEMORY_GOAL_MB:.0f} MB", peak < MEMORY_GOAL_MB),
                Figure(BENCH, f"{fmt} rows per second", n / r["seconds"], ",.0f", "", None),
            ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def _fill_database(job_path: Path, n: int) -> float:
    from runner.answers import utcnow
    from runner.job import load_job
    from runner.store import Store

    started = time.perf_counter()
    job = load_job(job_path)
    now = utcnow()
    with Store(job.db_path) as store:
        run_id = store.begin_run(job.name, pid=0, endpoint=job.api.endpoint, budget=0)
        store.db.conn.execute("BEGIN")
        for start in range(0, n, INSERT_CHUNK):
            rows = []
            for i in range(start, min(n, start + INSERT_CHUNK)):
                key = f"SKU-{i:08d}"
                extra = {"title": f"Product {i}", "brand": "=HYPERLINK(x)" if i % 97 == 0
                         else "Acme", "price": str(i % 1000)}
                record = {"_id": key, **extra, "_status": {"code": 200, "text": "OK"},
                          "_width": 640, "_height": 480,
                          "_objects": [{"name": "Card", "prob": 0.91, "_identification": {
                              "best_match": {"name": f"Card {i % 5000}", "set_code": "SBX1"}}}]}
                rows.append((job.name, key, f"s3://catalog/photos/{i:08d}.jpg", 1000,
                             f"1000:{i}", json.dumps(record, separators=(",", ":")),
                             f"{i:064x}", json.dumps(extra, separators=(",", ":")), run_id,
                             now, now, now))
            store.db.conn.executemany(
                "INSERT INTO items (job, key, uri, size, fingerprint, state, result, credits, "
                "content_hash, extra, sends, recorded_run, first_seen, updated_at, answered_at) "
                "VALUES (?, ?, ?, ?, ?, 'done', ?, 10, ?, ?, 1, ?, ?, ?, ?)", rows)
        store.db.conn.execute("COMMIT")
        store.finish_run(run_id, status="finished", exit_code=0)
    return time.perf_counter() - started


def _child(fmt: str, job_path: Path) -> dict[str, Any]:
    from runner.export import write_export
    from runner.job import load_job
    from runner.report import FieldPath, open_export

    job = load_job(job_path)
    out = job_path.with_name(f"export.{fmt}")
    started = time.perf_counter()
    exported = open_export(job, fields=[FieldPath.parse(FIELD)])
    rows = write_export(exported, fmt, str(out), job.source)
    return {"rows": rows, "seconds": time.perf_counter() - started, "peak_kb": peak_kb(),
            "bytes": out.stat().st_size}


def _run_child(fmt: str, job_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_export", "--child", fmt, "--job", str(job_path)]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                         check=False, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"export: the {fmt} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
