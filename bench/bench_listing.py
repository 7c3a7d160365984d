"""Benchmark: list N keys from a local S3 server with `list_items`, against a bare boto3 paginator.

    python bench/bench_listing.py [--keys 100000]      (or: python -m bench.bench_listing)

Each listing runs in its own subprocess so that its peak RSS is its own; the goal is a peak under
150 MB for 100,000 keys, whatever the number of keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
import uuid
from bisect import bisect_left, bisect_right
from hashlib import md5
from pathlib import Path
from typing import Any

from bench.fixtures import status_kb

REPO = Path(__file__).resolve().parent.parent
GOAL_MB = 150.0
PREFIX = "incoming/"
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_listing", description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000, help="objects to list (default 100000)")
    parser.add_argument("--stock-moto", action="store_true",
                        help="keep moto's own listing, which re-sorts the bucket for every page")
    parser.add_argument("--child", choices=("ximrun", "boto3"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.endpoint, args.bucket)))
        return 0
    return _parent(args.keys, args.stock_moto)


# --- the parent: server, objects, two measured listings ----------------------------------------


def _parent(n: int, stock_moto: bool) -> int:
    os.environ.update(FAKE_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        started = time.monotonic()
        _fill(endpoint, bucket, n)
        print(f"put {n:,} objects into s3://{bucket}/{PREFIX} in {time.monotonic() - started:.1f} s "
              "(straight into moto's backend: one HTTP PUT each would take minutes)")
        if not stock_moto:
            _speed_up_moto()
        results = {who: _run_child(who, endpoint, bucket) for who in ("boto3", "ximrun")}
    finally:
        server.stop()

    for who, r in results.items():
        if r["keys"] != n:
            print(f"{who} listed {r['keys']:,} keys, expected {n:,}", file=sys.stderr)
            return 1
    _report(n, results)
    return 0 if results["ximrun"]["peak_kb"] / 1024 < GOAL_MB else 1


def _fill(endpoint: str, bucket: str, n: int) -> None:
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(n):
        # Spread over a few sub-prefixes so that the listing crosses "folders" as a real one does.
        backend.put_object(bucket, f"{PREFIX}{i % 97:02d}/{i:08d}.jpg", b"\xff\xd8\xff")


def _speed_up_moto() -> None:
    """Make moto serve a ListObjectsV2 page in O(page) rather than O(bucket), and faster.

    Stock moto scans and sorts every key of the bucket for each page, then re-parses each key's
    timestamp with dateutil: 100,000 keys take many minutes and the bench would time moto, not
    the client. The index is made once per bucket size and used only for listings without a
    delimiter (what both clients here send); the timestamps are the same few strings over and
    over, so their rendering is memoised.
    """
    from moto.core.serialize import TimestampSerializer
    from moto.s3.models import S3Backend

    render = TimestampSerializer._convert_timestamp_to_str
    rendered: dict[tuple[Any, str], Any] = {}

    def convert_timestamp(self: Any, value: Any, timestamp_format: str) -> Any:
        if not isinstance(value, str):
            return render(self, value, timestamp_format)
        key = (value, timestamp_format)
        if key not in rendered:
            rendered[key] = render(self, value, timestamp_format)
        return rendered[key]

    TimestampSerializer._convert_timestamp_to_str = convert_timestamp

    stock = S3Backend.list_objects_v2
    index: dict[str, tuple[int, list[str]]] = {}

    def list_objects_v2(self: Any, bucket: Any, prefix: str | None, delimiter: str | None,
                        continuation_token: str | None, start_after: str | None,
                        max_keys: int) -> Any:
        if delimiter:
            return stock(self, bucket=bucket, prefix=prefix, delimiter=delimiter,
                         continuation_token=continuation_token, start_after=start_after,
                         max_keys=max_keys)
        names = index.get(bucket.name)
        if names is None or names[0] != len(bucket.keys):
            names = index[bucket.name] = (len(bucket.keys), sorted(bucket.keys.keys()))
        ordered, prefix = names[1], prefix or ""
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        i = max(bisect_left(ordered, prefix), bisect_right(ordered, after) if after else 0)
        page = []
        while i < len(ordered) and len(page) < max_keys and ordered[i].startswith(prefix):
            page.append(ordered[i])
            i += 1
        truncated = i < len(ordered) and ordered[i].startswith(prefix)
        token = None
        if truncated:
            token = md5(page[-1].encode()).hexdigest()
            self._pagination_tokens[token] = page[-1]
        return [bucket.keys[name] for name in page], truncated, token

    S3Backend.list_objects_v2 = list_objects_v2


def _run_child(who: str, endpoint: str, bucket: str) -> dict[str, Any]:
    env = {**os.environ, **FAKE_ENV, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.bench_listing", "--child", who,
           "--endpoint", endpoint, "--bucket", bucket]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False,
                         timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"the {who} listing failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(n: int, results: dict[str, dict[str, Any]]) -> None:
    rows = [("ximrun list_items", results["ximrun"]), ("boto3 paginator (baseline)", results["boto3"])]
    print()
    print(f"{'listing ' + format(n, ',') + ' keys':<28}{'keys/s':>8}{'wall s':>8}{'CPU s':>7}"
          f"{'keys/CPU s':>11}{'peak RSS':>10}{'at start':>10}{'listing peak':>14}"
          f"{'per 100k keys':>15}")
    for label, r in rows:
        per_100k = max(r["listing_peak_kb"] - r["start_kb"], 0) / 1024 * 100_000 / n
        print(f"{label:<28}{n / r['seconds']:>8,.0f}{r['seconds']:>8.1f}{r['cpu']:>7.1f}"
              f"{n / max(r['cpu'], 1e-9):>11,.0f}{_mb(r['peak_kb']):>10}{_mb(r['start_kb']):>10}"
              f"{_mb(r['listing_peak_kb']):>14}{per_100k:>12.1f} MB")
    x, b = results["ximrun"], results["boto3"]
    grown_x = max(x["listing_peak_kb"] - x["start_kb"], 1)
    grown_b = max(b["listing_peak_kb"] - b["start_kb"], 1)
    print(f"ratio ximrun / baseline: wall time {x['seconds'] / b['seconds']:.2f}x, "
          f"client CPU {x['cpu'] / b['cpu']:.2f}x, peak RSS {x['peak_kb'] / b['peak_kb']:.2f}x, "
          f"growth while listing {grown_x / grown_b:.2f}x")
    peak = x["peak_kb"] / 1024
    verdict = "met" if peak < GOAL_MB else "MISSED"
    print(f"goal: ximrun's whole process under {GOAL_MB:.0f} MB peak: {verdict} ({peak:.1f} MB)")
    print("wall time is bound by moto rendering XML; CPU s is the client's own.\n"
          "peak RSS: the whole process (VmHWM, start-up included); at start: RSS after a warm-up\n"
          "listing; listing peak: VmHWM reset at start; per 100k keys: (listing peak - at start)\n"
          "scaled to 100,000 keys (a page's worth of fixed cost dominates small runs).")


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


# --- the children: one listing each, measured from inside ---------------------------------------




def _reset_peak() -> bool:
    """Start VmHWM afresh (Linux >= 4.0), so that the listing's peak is not botocore's start-up's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _child(who: str, endpoint: str, bucket: str) -> dict[str, Any]:
    """List the bucket once, after a warm-up listing of an empty prefix.

    The warm-up pays the fixed costs (imports, client, botocore's S3 model, whose loading is the
    process's peak for small listings) so that the growth from "at start" to the peak while
    listing is what the listing itself costs.
    """
    if who == "ximrun":
        from runner.job import SourceConfig
        from runner.sources import list_items

        def source(prefix: str) -> SourceConfig:
            return SourceConfig(paths=(f"s3://{bucket}/{prefix}",),
                                storage_options={"endpoint_url": endpoint})

        sum(1 for _ in list_items(source("warm-up/")))

        def listing() -> int:
            return sum(1 for _ in list_items(source(PREFIX)))
    else:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.list_objects_v2(Bucket=bucket, Prefix="warm-up/")

        def listing() -> int:
            count = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                          Prefix=PREFIX):
                count += len(page.get("Contents", ()))
            return count

    # Not ru_maxrss where /proc has VmHWM: Linux carries ru_maxrss over from the parent across
    # fork and exec, so a child of the big moto process would report the parent's peak.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    start_kb = status_kb("VmRSS") or maxrss
    startup_peak_kb = status_kb("VmHWM") or maxrss
    reset = _reset_peak()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    count = listing()
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    listing_peak_kb = (status_kb("VmHWM") if reset else None) or maxrss
    peak_kb = max(startup_peak_kb, listing_peak_kb)
    return {"keys": count, "seconds": seconds, "cpu": cpu, "start_kb": start_kb,
            "peak_kb": peak_kb, "listing_peak_kb": listing_peak_kb}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    raise SystemExit(main())
