"""Preparation: listed Items become records ready to send (or a refusal), read and checked.

Reading goes through storage.py, the pixels through images.py (loaded with the first image, so
that a rerun with nothing to send starts without Pillow). Runs on the preparation threads, or on a
Dask worker.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

from runner.errors import ReadError
from runner.job import ImagePolicy, Job
from runner.records import Item, PreparedImage, Ready, Refused, RequestRecord
from runner.storage import is_local, presign, read_bytes, read_many

HEAD_BYTES = 64 * 1024  # what send = "url" reads of an object to check its format
FETCH_BYTES = 16 * 2**20  # remote bytes a preparation task fetches at once, at most (but one)
FETCH_UNKNOWN_SIZE = 2**20  # what an object of unknown size counts for


def prepare_items(job: Job, items: Sequence[Item]) -> list[Ready | Refused]:
    """Read, check and convert images, in order; never raises for a bad image or a vanished
    object. Objects in remote storage are fetched several at a time."""
    policy = job.images
    out: list[Ready | Refused | None] = [None] * len(items)
    to_read: list[int] = []
    for i, item in enumerate(items):
        if item.problem is not None:  # a manifest row with nothing to read
            out[i] = Refused(item, item.problem, read_failed=True)
            continue
        if policy.send == "url":
            try:
                out[i] = _by_url(job, item)
            except ReadError as exc:
                out[i] = Refused(item, str(exc), read_failed=True)
        if out[i] is None:
            to_read.append(i)
    for group in fetch_groups(items, to_read):
        data = read_many([items[i] for i in group], job.source, limit=policy.max_bytes)
        for i, got in zip(group, data, strict=True):
            if isinstance(got, ReadError):
                out[i] = Refused(items[i], str(got), read_failed=True)
            else:
                out[i] = _from_bytes(items[i], got, policy)
    return out  # type: ignore[return-value]


def fetch_groups(items: Sequence[Item], indexes: Sequence[int]) -> Iterator[list[int]]:
    """The images read together: a local file alone (read, prepared, let go, then the next);
    remote objects together up to FETCH_BYTES, so that a task of large photos does not hold
    them all at once."""
    group: list[int] = []
    total = 0
    for i in indexes:
        item = items[i]
        if is_local(item.uri):
            yield [i]
            continue
        size = item.size if item.size is not None else FETCH_UNKNOWN_SIZE
        if group and total + size > FETCH_BYTES:
            yield group
            group, total = [], 0
        group.append(i)
        total += size
    if group:
        yield group


def _by_url(job: Job, item: Item) -> Ready | Refused | None:
    """send = "url": a URL for the API to fetch, or None when the bytes must be sent after all
    (no presigned URL, or the image needs converting)."""
    from runner import images

    policy = job.images
    url = presign(item, job.source)
    if url is None:
        return None
    head = read_bytes(item, job.source, max_bytes=HEAD_BYTES)
    if not head:
        return Refused(item, "empty", read_failed=False)
    verdict = images.decide(images.sniff_format(head), policy)
    if verdict.action == "reject":
        return Refused(item, verdict.reason or "rejected", read_failed=False)
    if verdict.action == "accept" and policy.max_side == 0:
        # The API fetches the bytes itself; without them there is no content hash.
        return Ready(item, RequestRecord(item.key, url=url, extra=item.extra), None)
    return None


def _from_bytes(item: Item, data: bytes, policy: ImagePolicy) -> Ready | Refused:
    # Pillow and its plugins load with the first image prepared: a rerun with nothing to send
    # starts without them.
    from runner import images

    result = images.prepare_image(data, policy)
    if not isinstance(result, PreparedImage):
        return Refused(item, result.reason or "rejected", read_failed=False)
    digest = hashlib.sha256(result.data).hexdigest()
    return Ready(item, RequestRecord(item.key, data=result.data, extra=item.extra), digest,
                 result.width, result.height)


def prep_signature(job: Job) -> str:
    p = job.images
    body = f"{p.max_side}|{','.join(sorted(p.transcode))}|{p.send}|{p.max_pixels}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def prepare_smaller(job: Job, ready: Ready) -> RequestRecord | None:
    """The record again, downscaled to half its longer side (at least 64 pixels), for an image
    the API found too large; None if it cannot be read or converted any more."""
    from runner import images

    side = max(ready.width or 0, ready.height or 0) or job.images.max_side
    policy = replace(job.images, max_side=max(64, side // 2))
    try:
        data = read_bytes(ready.item, job.source, limit=job.images.max_bytes)
    except ReadError:
        return None
    smaller = images.prepare_image(data, policy)
    if not isinstance(smaller, PreparedImage):
        return None
    return RequestRecord(ready.item.key, data=smaller.data, extra=ready.item.extra)


# --- in a worker process of the local executor (executors/preparers.py) ------------------------
# Here rather than there: a worker then imports this module and images.py, not the executors.

# What a worker hands back per image: (bytes, content hash, width, height), (None, URL, width,
# height) for send = "url", or (reason, read_failed) for a refusal.
Made = tuple[bytes | None, str | None, int | None, int | None] | tuple[str, bool]
_worker_job: Job | None = None


ORPHAN_CHECK_S = 1.0  # how often a worker looks whether its run is still there


def worker_start(job: Job, run_pid: int) -> None:
    """A terminal's Ctrl-C reaches the whole process group, and a service manager's SIGTERM
    every process of the service; only the run decides what they mean (finish the requests in
    flight, stop), and it ends its workers on its way out. A run killed outright (kill -9, the
    out-of-memory killer, a cron job's time limit) cannot: its workers, deaf to SIGTERM, would
    wait for work forever, so each leaves by itself once its run (`run_pid`) is gone."""
    import signal

    global _worker_job
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _worker_job = job
    threading.Thread(target=_leave_without, args=(run_pid,), name="ximrun-run-watch",
                     daemon=True).start()


def _leave_without(run_pid: int) -> None:
    """Exit this worker once its parent is no longer the run (the run died: the worker was
    handed to another parent). Nothing of its work is lost: the run never recorded it."""
    while os.getppid() == run_pid:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)


def worker_up() -> None:
    """A pool's first task: it returns once a worker has started, Pillow imported."""
    from runner import images  # noqa: F401 -- what the first image would otherwise wait for


def prepare_compact(items: Sequence[Item]) -> list[Made]:
    """prepare_items, reduced to what crosses back to the run (no Item, no dataclasses)."""
    assert _worker_job is not None
    out: list[Made] = []
    for r in prepare_items(_worker_job, items):
        if isinstance(r, Ready):
            rec = r.record
            if rec.data is None:
                out.append((None, rec.url, r.width, r.height))
            else:
                out.append((rec.data, r.content_hash, r.width, r.height))
        else:
            out.append((r.reason, r.read_failed))
    return out
