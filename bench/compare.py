"""Before and after: this checkout's runner against an earlier commit's, in alternating rounds.

    python -m bench.compare REV [--rounds 8] [--images 5000] [--dask-images 3000]
                                [--dask-latency-ms 200] [--no-pipeline | --no-dask]

The figures of one `make bench` move with the shared machine by 15 % and more from one minute to
the next; a change is only measured against what came before it on the same machine at the same
time. This takes `runner/` of REV (`git archive`, into a temporary folder) and the checkout's
own `runner/` (uncommitted changes included), and measures them in turn, each round in a fresh
process per side, the order alternating:

- the pipeline at concurrency 32 (5,000 small JPEGs, the emulator at 100 ms, batches of 10):
  the run process's CPU per image, with its preparation workers, and images per second against
  a bare client that only posts prebuilt bodies, measured in the same rounds;
- a Dask cluster of `--workers` (2) processes, 8 requests in flight each (the emulator at
  `--dask-latency-ms`, 200): the coordinator's CPU per image of a run of `--dask-images`, per
  further image (a run of 100 images measured first tells the run's fixed cost), and images per
  second against the most the requests in flight allow.

Both sides use this checkout's emulator and bench code; only `runner/` differs. REV must read the
job file keys used here (name, source.paths, api endpoint, token_env, batch_size, concurrency,
state.db, executor kind and address). Prints each side's median and range, and after / before.
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

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BATCH = 10
PER_WORKER = 8
SMALL = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare against (anything git rev-parse takes)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per side (default 8)")
    parser.add_argument("--images", type=int, default=5000,
                        help="images of a pipeline run (default 5000)")
    parser.add_argument("--dask-images", type=int, default=3000,
                        help="images of a Dask run (default 3000)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers (default 2)")
    parser.add_argument("--dask-latency-ms", type=float, default=200.0,
                        help="the emulator's latency for the Dask runs (default 200)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--no-dask", action="store_true", help="the pipeline only")
    what.add_argument("--no-pipeline", action="store_true", help="Dask only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.images < 1 or args.dask_images <= SMALL:
        raise SystemExit(f"bench.compare: --rounds and --images at least 1, --dask-images "
                         f"more than {SMALL}")
    tmp = Path(tempfile.mkdtemp(prefix="ximrun-bench-compare-"))
    try:
        sides = {"before": _extract(args.rev, tmp / "before"), "after": _link(tmp / "after")}
        _images(tmp, args)
        if not args.no_pipeline:
            results = _pipeline(tmp, sides, args)
            _print_pipeline(args.rev, results)
        if not args.no_dask:
            dask = _dask(tmp, sides, args)
            _print_dask(args.rev, args, dask)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# --- the two sides -------------------------------------------------------------------------------


def _extract(rev: str, folder: Path) -> Path:
    """runner/ of `rev`, alone in `folder`."""
    folder.mkdir(parents=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", commit, "runner"], cwd=REPO,
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or exc
        raise SystemExit(f"bench.compare: cannot take runner/ of {rev!r} from git: "
                         f"{detail.decode() if isinstance(detail, bytes) else detail}") from None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    print(f"before: runner/ of {commit[:12]} ({rev}); after: this checkout's runner/")
    return folder


def _link(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "runner").symlink_to(REPO / "runner", target_is_directory=True)
    return folder


def _images(tmp: Path, args: argparse.Namespace) -> None:
    from bench.fixtures import write_tiny_jpegs

    if not args.no_pipeline:
        write_tiny_jpegs(tmp / "images", args.images)
    write_tiny_jpegs(tmp / "warm-up", 200, seed=1)
    if not args.no_dask:
        write_tiny_jpegs(tmp / "dask-images", args.dask_images, seed=3)
        write_tiny_jpegs(tmp / "small", SMALL, seed=2)


def _child(side: Path, *args: str) -> dict[str, Any]:
    """This file run with `side`'s runner first on the path; its last line, as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(side), str(REPO)])}
    out = subprocess.run([sys.executable, str(HERE), *args], env=env, capture_output=True,
                         text=True, cwd=side, check=False, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"bench.compare: {' '.join(args[:1])} failed with {side.name}'s "
                         f"runner:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _orders(rounds: int, names: list[str]) -> list[list[str]]:
    """Each round's order: rotated and reversed in turn, so that no side always goes first."""
    out = []
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        out.append(order[::-1] if r % 2 else order)
    return out


# --- the pipeline ---------------------------------------------------------------------------------


def _pipeline(tmp: Path, sides: dict[str, Path], args: argparse.Namespace
              ) -> dict[str, list[dict[str, Any]]]:
    from bench.fixtures import emulator_process, set_bench_token

    token, restore = set_bench_token()
    results: dict[str, list[dict[str, Any]]] = {"bare": [], "before": [], "after": []}
    try:
        with emulator_process(latency_ms=100, token=token, max_records=BATCH) as endpoint:
            for r, order in enumerate(_orders(args.rounds, list(results))):
                for name in order:
                    if name == "bare":
                        got = _child(sides["after"], "--bare", str(tmp / "images"),
                                     str(args.images), endpoint, token)
                    else:
                        got = _child(sides[name], "--pipeline", str(tmp), endpoint)
                    results[name].append(got)
                print(f"  pipeline round {r + 1}: " + ", ".join(
                    f"{n} {_brief(results[n][-1])}" for n in results), flush=True)
    finally:
        restore()
    return results


def _brief(d: dict[str, Any]) -> str:
    if "bare_cpu" in d:
        return f"{d['ips']:,.0f} img/s {d['bare_cpu']:.0f} us"
    return f"{d['ips']:,.0f} img/s run {d['run']:.0f} us all {d['all']:.0f} us"


def _print_pipeline(rev: str, res: dict[str, list[dict[str, Any]]]) -> None:
    bare = statistics.median(d["ips"] for d in res["bare"])
    print(f"\npipeline, concurrency 32, {len(res['bare'])} rounds (medians, ranges): the bare "
          f"client {bare:,.0f} img/s, {_spread([d['bare_cpu'] for d in res['bare']])} us of "
          f"CPU per image")
    for key, what in (("run", "the run process's CPU per image, us"),
                      ("all", "with its preparation workers, us"),
                      ("ips", "images per second")):
        before = [d[key] for d in res["before"]]
        after = [d[key] for d in res["after"]]
        ratio = statistics.median(after) / statistics.median(before)
        print(f"  {what:40s} {rev}: {_spread(before):>16s}  now: {_spread(after):>16s}  "
              f"now / {rev}: {ratio:.2f}")
    for name in ("before", "after"):
        share = statistics.median(d["ips"] for d in res[name]) / bare
        print(f"  {name}: {share:.2f} of the bare client's images per second")


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def _run_pipeline(tmp: str, endpoint: str) -> dict[str, Any]:
    """In a child: a warm-up run, then the measured one, with the runner first on the path."""
    from bench.fixtures import cpu_seconds
    from runner.executors import run_job

    folder = Path(tmp)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    run_job(_job(work, "warm-up", folder / "warm-up", endpoint, 8))
    job = _job(work, "run", folder / "images", endpoint, 32)
    cpu, children, started = cpu_seconds(), cpu_seconds("children"), time.perf_counter()
    summary = run_job(job)
    wall = time.perf_counter() - started
    cpu, children = cpu_seconds() - cpu, cpu_seconds("children") - children
    n = summary.done
    if n != summary.listed:
        raise SystemExit(f"{n} of {summary.listed} images done: {summary.status}")
    return {"run": cpu / n * 1e6, "all": (cpu + children) / n * 1e6, "ips": n / wall}


def _run_bare(images: str, n: str, endpoint: str, token: str) -> dict[str, Any]:
    from bench.bench_pipeline import _bare_client

    seconds, cpu = _bare_client(Path(images), int(n), endpoint, token, 32)
    return {"ips": int(n) / seconds, "bare_cpu": cpu / int(n) * 1e6}


def _job(work: Path, name: str, images: Path, endpoint: str, concurrency: int) -> Any:
    from bench.fixtures import write_job
    from runner.job import load_job

    return load_job(write_job(work, name=name, images=images, endpoint=endpoint,
                              concurrency=concurrency, batch_size=BATCH, db=f"{name}.db"))


# --- Dask -------------------------------------------------------------------------------------------


def _dask(tmp: Path, sides: dict[str, Path], args: argparse.Namespace
          ) -> dict[str, list[dict[str, Any]]]:
    from bench.fixtures import emulator_process, set_bench_token

    token, restore = set_bench_token()
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    try:
        with emulator_process(latency_ms=args.dask_latency_ms, token=token,
                              max_records=BATCH) as endpoint:
            for r, order in enumerate(_orders(args.rounds, list(results))):
                for name in order:
                    results[name].append(_child(sides[name], "--dask", str(tmp), endpoint,
                                                str(args.workers), str(args.dask_images)))
                print(f"  dask round {r + 1}: " + ", ".join(
                    f"{n} {results[n][-1]['cpu']:.0f} us" for n in results), flush=True)
    finally:
        restore()
    return results


def _print_dask(rev: str, args: argparse.Namespace, res: dict[str, list[dict[str, Any]]]
                ) -> None:
    best = PER_WORKER * args.workers * BATCH / (args.dask_latency_ms / 1000)
    print(f"\nDask, {args.workers} worker(s), the emulator at {args.dask_latency_ms:.0f} ms "
          f"(at most {best:,.0f} images per second), {len(res['before'])} rounds "
          "(medians, ranges):")
    for key, what in (("cpu", "the coordinator's CPU per image, us"),
                      ("further", "per further image, us"), ("ips", "images per second")):
        before = [d[key] for d in res["before"]]
        after = [d[key] for d in res["after"]]
        ratio = statistics.median(after) / statistics.median(before)
        print(f"  {what:40s} {rev}: {_spread(before):>16s}  now: {_spread(after):>16s}  "
              f"now / {rev}: {ratio:.2f}")


def _run_dask(tmp: str, endpoint: str, workers: str, images: str) -> dict[str, Any]:
    """In a child: a local cluster whose workers import the same runner (they inherit the
    path), and the coordinator in a child of its own, so that its CPU time is its own."""
    import distributed

    from bench.fixtures import write_job

    folder = Path(tmp)
    work = Path(tempfile.mkdtemp(prefix="dask-", dir=folder))
    with distributed.LocalCluster(n_workers=int(workers), processes=True,
                                  threads_per_worker=PER_WORKER + 1,
                                  dashboard_address=None) as cluster:
        executor = f'\n[executor]\nkind = "dask"\naddress = "{cluster.scheduler_address}"\n'
        concurrency = PER_WORKER * int(workers)
        jobs = [write_job(work, name=name, images=folder / sub, endpoint=endpoint,
                          concurrency=concurrency, batch_size=BATCH, db=f"{name}.db",
                          extra=executor)
                for name, sub in (("warm-up", "warm-up"), ("small", "small"),
                                  ("run", "dask-images"))]
        # The child inherits PYTHONPATH: this side's runner first, then the checkout.
        out = subprocess.run([sys.executable, str(HERE), "--coordinator", *map(str, jobs),
                              images], capture_output=True, text=True, check=False,
                             timeout=3600)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _run_coordinator(warm_up: str, small: str, job_file: str, images: str) -> dict[str, Any]:
    """bench_dask's coordinator child (a warm-up, a small run, the measured run), reduced to
    per-image figures."""
    from bench.bench_dask import _child

    r = _child(warm_up, small, job_file)
    n = r["done"]
    if n != int(images):
        raise SystemExit(f"{n} of {images} images done on Dask: {r['status']}")
    return {"cpu": r["cpu"] / n * 1e6, "further": (r["cpu"] - r["small_cpu"]) / (n - SMALL) * 1e6,
            "ips": n / r["wall"]}


def _as_child(argv: list[str]) -> int:
    """The child modes: one measurement, printed as a JSON line."""
    mode, rest = argv[0], argv[1:]
    modes = {"--pipeline": _run_pipeline, "--bare": _run_bare, "--dask": _run_dask,
             "--coordinator": _run_coordinator}
    print(json.dumps(modes[mode](*rest)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--pipeline", "--bare", "--dask", "--coordinator"):
        raise SystemExit(_as_child(sys.argv[1:]))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    raise SystemExit(main())
