"""The emulator in a process of its own, as the real API is on machines of its own.

    python -m bench.emulator --latency-ms 100 --token T [--analysis]

Prints `endpoint URL` once it listens, then serves until stdin closes (the parent went away) or a
signal. In the benchmark's own process the emulator would share the interpreter lock with the
client it measures: every answer it builds would stall ximrun's threads, and the other way round.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--token", required=True)
    parser.add_argument("--max-records", type=int, default=10)
    parser.add_argument("--analysis", action="store_true",
                        help="keep the pixel analysis of every record")
    args = parser.parse_args(argv)

    from bench.fixtures import lean_emulator
    from runner.job import SandboxSettings
    from runner.sandbox import Sandbox

    settings = SandboxSettings(latency_ms=args.latency_ms, token=args.token, credits=10**12,
                               max_records=args.max_records)
    with lean_emulator(args.analysis), Sandbox(settings) as sb:
        print(f"endpoint {sb.endpoint_url()}", flush=True)
        sys.stdin.read()  # returns at end of file: the parent closed the pipe or died
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
