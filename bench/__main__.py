"""Run every benchmark and print one table of their figures.

    python -m bench            quick sizes: about 5 minutes on a 2-core machine
    python -m bench --full     the issue's sizes (1,000,000 done images for resume: much longer)
    python -m bench pipeline prepare      only these

Each benchmark also runs alone: python -m bench.bench_pipeline --help, and so on. Exit status 1
when a goal is missed.
"""

from __future__ import annotations

import argparse
import importlib
import time

from bench.fixtures import Figure, all_met, print_figures

# Each benchmark's module is imported only when it runs. Worker processes started with "spawn"
# (the pipeline's preparation workers) import this module again as their main: with every
# benchmark imported here, each worker would pay about 80 ms more to start than under the
# `ximrun` command, whose script imports one small module, and the figures would count it.

# name -> (module in bench/, quick arguments, full arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "pipeline": ("bench_pipeline", ["--images", "5000"], ["--images", "5000"]),
    "prepare": ("bench_prepare", ["--images", "3", "--rounds", "3"],
                ["--images", "5", "--rounds", "5"]),
    "resume": ("bench_resume", ["--images", "200000"], ["--images", "1000000"]),
    "memory": ("bench_memory", ["--images", "30000"], ["--images", "100000"]),
    "listing": ("bench_listing", ["--keys", "20000"], ["--keys", "100000"]),
    "dask": ("bench_dask", ["--images", "1000"], ["--images", "3000"]),
    "report": ("bench_report", ["--images", "20000"], ["--images", "100000"]),
    "export": ("bench_export", ["--rows", "100000"], ["--rows", "1000000"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes, not quick ones")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    figures: list[Figure] = []
    timings: list[str] = []
    for name in args.names or BENCHMARKS:
        module_name, quick, full = BENCHMARKS[name]
        module = importlib.import_module(f"bench.{module_name}")
        bench_args = full if args.full else quick
        print(f"\n=== {name}: {' '.join(bench_args)} ===", flush=True)
        started = time.monotonic()
        if hasattr(module, "run") and hasattr(module, "build_parser"):
            figures += module.run(module.build_parser().parse_args(bench_args))
        else:  # it prints its own report and says by its exit status whether its goal is met
            ok = module.main(bench_args) == 0
            figures.append(Figure(name, "goal of its report above", float(ok), ".0f",
                                  "1 = met", ok))
        timings.append(f"{name} {time.monotonic() - started:.0f} s")
    print_figures(figures, f"\n=== all figures ({'full' if args.full else 'quick'} sizes; "
                           f"{', '.join(timings)}) ===")
    return 0 if all_met(figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
