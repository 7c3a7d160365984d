"""kill -9 at random instants: the real CLI in a subprocess, killed over and over during one job.

Every kill is followed by `PRAGMA integrity_check` and a look at `status`; the job then runs to
completion, and the emulator's ledger and the database must agree: every image final, none lost,
no `done` image sent again, only the images in flight at a kill sent twice (and `status` named
them), every request the API saw announced in `attempts`, credits recorded once per answer.

The kill moments come from one seed (XIMRUN_CRASH_SEED replays a failure).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from driver import (
    CHILD_API,
    TOKEN,
    attempts_per_key,
    export_rows,
    integrity,
    make_images,
    settle,
    start,
    status_json,
    wait_for,
    write_job,
    ximrun,
)

from runner.job import SandboxSettings
from runner.sandbox import Sandbox

pytestmark = pytest.mark.slow  # dozens of subprocesses, each killed with SIGKILL

SEED = int(os.environ.get("XIMRUN_CRASH_SEED", "20260518"))
PER_IMAGE = 10


# --- the kill -9 test ----------------------------------------------------------------------------

@dataclass
class Life:
    """One process that was killed: what the API saw from it, and what the database kept."""

    first: int  # index of its first ledger entry
    last: int  # index after its last ledger entry
    named: set[str]  # keys status listed as possibly billed without an answer, for its run
    final: set[str]  # keys in a final state (done/failed/rejected) after the kill
    done: set[str]


def kill_many_times(tmp: Path, sb: Sandbox, job: Path, db: Path, *, kills: int, seed: int,
                    max_growth: int) -> list[Life]:
    rng = random.Random(seed)
    lives: list[Life] = []
    seen_attempts: set[tuple[int, int, int]] = set()
    while len(lives) < kills:
        first = len(sb.ledger())
        child = start(tmp, "run", str(job), tag="kill")
        if rng.random() < 0.25:
            # Anywhere: start-up, listing, classification, the first requests.
            time.sleep(rng.uniform(0.05, 1.0))
        else:
            # While answers come back: after a few more records, at a random instant.
            grow = rng.randint(1, max_growth)
            wait_for(lambda: len(sb.ledger()) >= first + grow,  # noqa: B023
                     f"{grow} records to reach the API (kill {len(lives) + 1}, seed {seed})",
                     child)
            time.sleep(rng.uniform(0, 0.08))
        child.proc.send_signal(signal.SIGKILL)
        rc = child.wait()
        if rc != -signal.SIGKILL:
            pytest.fail(f"the job ended on its own ({rc}) after {len(lives)} kills: "
                        f"give it more images\n{child.output()}")
        ledger = settle(sb)
        check = integrity(db, tmp / "check") if db.exists() else "ok"
        assert check == "ok", f"kill {len(lives) + 1} (seed {seed}) left a corrupt database: {check}"
        named: set[str] = set()
        final: set[str] = set()
        done: set[str] = set()
        if db.exists():
            for u in status_json(job)["possibly_billed_without_answer"]:
                ident = (u["run"], u["batch"], u["attempt"])
                if ident not in seen_attempts:
                    seen_attempts.add(ident)
                    named.update(u["keys"])
            rows = export_rows(job)
            final = {k for k, r in rows.items() if r["state"] != "pending"}
            done = {k for k, r in rows.items() if r["state"] == "done"}
        lives.append(Life(first, len(ledger), named, final, done))
    return lives


def check_after_kills(sb: Sandbox, lives: list[Life], rows: dict[str, dict], db: Path,
                      seed: int) -> Counter[str]:
    """The invariants that hold with or without API faults; returns sends per key."""
    ledger = sb.ledger()
    ids = [e.record_id for e in ledger]
    for n, life in enumerate(lives, 1):
        where = f"kill {n} (seed {seed})"
        this = set(ids[life.first:life.last])
        later = set(ids[life.last:])
        # No image that was done is ever sent again.
        assert not life.done & later, f"{where}: done images sent again: {life.done & later}"
        # What the API saw from the killed run but the database did not record: status names it.
        unrecorded = this - life.final
        assert unrecorded <= life.named, f"{where}: not named: {unrecorded - life.named}"
        # ... and nothing named was recorded as answered.
        assert not life.named & life.done, f"{where}: named yet done: {life.named & life.done}"
        # Only the images in flight at the kill are sent again.
        again = this & later
        assert again <= life.named, f"{where}: sent again but not in flight: {again - life.named}"
    # Every request the API saw was announced in `attempts` first.
    announced = attempts_per_key(db)
    sends = Counter(ids)
    over = {k: (n, announced[k]) for k, n in sends.items() if n > announced[k]}
    assert not over, f"requests the database never announced (sent, announced): {over}"
    # Credits: one answer's worth per image ximrun recorded as done, in items and in runs alike.
    done = {k for k, r in rows.items() if r["state"] == "done"}
    assert all(rows[k]["credits"] == PER_IMAGE for k in done)
    assert sum(r["credits"] for r in rows.values()) == PER_IMAGE * len(done)
    answered_ok = {e.record_id for e in ledger if e.code == 200 and e.billed}
    assert done <= answered_ok, f"done without a billed answer: {done - answered_ok}"
    return sends


def test_kill_9_at_random_instants_loses_nothing_and_pays_only_for_flight(tmp_path):
    n_images, kills, bs, conc = 320, 20, 2, 2
    started = time.monotonic()
    paths = make_images(tmp_path / "imgs", n_images)
    keys = {str(p) for p in paths}
    settings = SandboxSettings(token=TOKEN, latency_ms=30, jitter_ms=50, seed=SEED)
    with Sandbox(settings) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", name="crash",
                        api=dict(CHILD_API, batch_size=bs, concurrency=conc),
                        credits={"per_image": PER_IMAGE})
        db = tmp_path / "state" / "crash.db"
        lives = kill_many_times(tmp_path, sb, job, db, kills=kills, seed=SEED, max_growth=10)
        final = start(tmp_path, "run", str(job), "--json", tag="final")
        assert final.wait() == 0, final.output()
        summary = json.loads(final.stdout)
        assert summary["status"] == "finished" and summary["pending"] == 0

        assert integrity(db, tmp_path / "check") == "ok"
        rows = export_rows(job)
        assert set(rows) == keys, "images lost or invented"
        assert all(r["state"] == "done" for r in rows.values()), \
            Counter(r["state"] for r in rows.values())
        sends = check_after_kills(sb, lives, rows, db, SEED)
        ledger = sb.ledger()
        assert set(sends) == keys
        duplicates = sum(n - 1 for n in sends.values())
        bound = kills * conc * bs
        assert duplicates <= bound, f"{duplicates} duplicate sends > {bound} (seed {SEED})"
        # Without faults every send was billed: the extra credits are exactly the duplicates.
        billed = sum(e.billed for e in ledger)
        assert billed == n_images + duplicates
        st = status_json(job)
        assert st["states"] == {"pending": 0, "done": n_images, "failed": 0, "rejected": 0}
        assert st["credits"]["recorded"] == PER_IMAGE * n_images
        named = set().union(*(life.named for life in lives))
        assert {k for k, n in sends.items() if n > 1} <= named
        # A run after completion sends nothing.
        before = len(ledger)
        assert ximrun(tmp_path, "run", str(job)).proc.returncode == 0
        assert len(sb.ledger()) == before
    print(f"\n{kills} kills (seed {SEED}), {n_images} images: {duplicates} duplicate sends "
          f"(bound {bound}), {len(named)} images named in flight, "
          f"{time.monotonic() - started:.1f}s")


def test_kill_9_with_api_faults_still_ends_consistent(tmp_path):
    """Server errors and lost answers on top of the kills: retries inside a run are counted."""
    n_images, kills, bs, conc = 120, 10, 3, 2
    seed = SEED + 1
    paths = make_images(tmp_path / "imgs", n_images)
    keys = {str(p) for p in paths}
    settings = SandboxSettings(token=TOKEN, latency_ms=30, jitter_ms=50, p500=0.05, pdrop=0.05,
                               seed=seed)
    with Sandbox(settings) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", name="crash",
                        api=dict(CHILD_API, batch_size=bs, concurrency=conc),
                        credits={"per_image": PER_IMAGE})
        db = tmp_path / "state" / "crash.db"
        lives = kill_many_times(tmp_path, sb, job, db, kills=kills, seed=seed, max_growth=12)
        final = start(tmp_path, "run", str(job), tag="final")
        rc = final.wait()
        rows = export_rows(job)
        assert rc == (1 if any(r["state"] == "failed" for r in rows.values()) else 0), \
            final.output()
        assert integrity(db, tmp_path / "check") == "ok"
        assert set(rows) == keys
        assert all(r["state"] in ("done", "failed") for r in rows.values())
        check_after_kills(sb, lives, rows, db, seed)
        done = sum(r["state"] == "done" for r in rows.values())
        assert status_json(job)["credits"]["recorded"] == PER_IMAGE * done
        # An answer lost on the wire is visible: resent within its run (so `sends` counts it), or
        # named by status after the kill that came first.
        named = set().union(*(life.named for life in lives))
        lost = {e.record_id for e in sb.ledger() if e.billed and not e.answered}
        assert lost, "no answer was lost: raise pdrop"
        invisible = {k for k in lost if k not in named and rows[k]["sends"] < 2}
        assert not invisible, f"billed, lost and never counted (seed {seed}): {invisible}"


# --- what a killed run leaves running ------------------------------------------------------------


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines (Linux's /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out[int(entry.name)] = cmd
    return out


def _running(pid: int) -> bool:
    """Whether the process exists and has not exited (an exited orphan may wait as a zombie
    for a parent that does not reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_run_killed_with_sigkill_leaves_no_preparation_process_running(tmp_path):
    # Preparation workers ignore SIGTERM (the run decides what a stop means) and wait for
    # work; with their run killed outright they waited forever: a nightly job killed by a
    # time limit left a process or two behind every night. Each now leaves once its run is
    # gone.
    make_images(tmp_path / "imgs", 600)
    with Sandbox(SandboxSettings(token=TOKEN, latency_ms=300)) as sb:
        job = write_job(tmp_path, sb, tmp_path / "imgs", name="orphans",
                        api=dict(CHILD_API, batch_size=10, concurrency=2))
        child = start(tmp_path, "run", str(job), tag="killed")
        workers: dict[int, str] = {}

        def preparing() -> bool:
            workers.update({p: c for p, c in _children(child.proc.pid).items()
                            if "multiprocessing" in c})
            return any("spawn_main" in c for c in workers.values())

        wait_for(preparing, "the run's preparation workers", child)
        child.proc.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        deadline = time.monotonic() + 15
        while any(_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {p: c for p, c in workers.items() if _running(p)}
        assert not left, f"still running after their run was killed: {left}"
