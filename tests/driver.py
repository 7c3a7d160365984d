"""The one driver of the tests: the real CLI in-process and in a subprocess, job files, images.

Test modules import from here (and from `s3server`, whose fixtures conftest provides), never
from one another.

- In-process CLI: `invoke`, and the readers `run_json`, `plan_json`, `status_json`,
  `export_rows`, which assert the command's exit code.
- Job files: `write_job`, one keyword argument per table of the job file.
- Images: `jpeg`, `png`, `bars_jpeg`, `make_images`.
- The emulator: `sends`, `settle`.
- The console script in a subprocess: `start`, `ximrun`, `Child`, `child_env`, `wait_for`,
  and `CHILD_API` for the jobs it runs.
- The state database as another process sees it: `integrity`, `db_count`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from runner.cli import main
from runner.sandbox import LedgerEntry, Sandbox

TOKEN = "test-token"
REPO = Path(__file__).resolve().parent.parent
PROC_TIMEOUT_S = 60  # a subprocess that takes longer than this hangs: the test kills it and fails
# [api] keys for the jobs test_crash and test_signals run in a subprocess they kill or signal:
# a generous timeout, and retries enough for the faults they inject. write_job(..., api=dict(
# CHILD_API, batch_size=.., concurrency=..)).
CHILD_API = {"timeout_s": 20, "max_retries": 5}

# --- the CLI in-process --------------------------------------------------------------------------


def invoke(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    """`ximrun ARGS` through click's runner, with the test token unless env says otherwise."""
    return CliRunner().invoke(main, list(args), env={"XIMILAR_TOKEN": TOKEN, **(env or {})},
                              catch_exceptions=False)


def run_json(job: Path, *args: str, exit_code: int = 0) -> dict:
    """`ximrun run JOB --json ARGS`: asserts the exit code, returns the summary."""
    res = invoke("run", str(job), "--json", *args)
    assert res.exit_code == exit_code, res.output
    return json.loads(res.stdout)


def plan_json(job: Path) -> dict:
    res = invoke("plan", str(job), "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def status_json(job: Path) -> dict:
    res = invoke("status", str(job), "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def export_rows(job: Path, *args: str) -> dict[str, dict]:
    """`ximrun export JOB ARGS` (JSON lines) by key; no key may come twice."""
    res = invoke("export", str(job), *args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    rows = {row["key"]: row for row in map(json.loads, lines)}
    assert len(rows) == len(lines), "a key was exported twice"
    return rows


# --- job files -----------------------------------------------------------------------------------


def write_job(tmp: Path, endpoint: Sandbox | str, paths: str | Path | Sequence[str | Path] = (),
              *, name: str = "t", manifest: str | None = None, exclude: Sequence[str] = (),
              storage_options: Mapping[str, Any] | None = None,
              api: Mapping[str, Any] | None = None, images: Mapping[str, Any] | None = None,
              credits: Mapping[str, Any] | None = None,
              executor: Mapping[str, Any] | None = None, db: str | None = None,
              extra: str = "") -> Path:
    """Write `tmp/NAME.toml` and return its path.

    endpoint: a Sandbox (its default endpoint) or a URL, or "sandbox" for the embedded emulator.
    paths / manifest / exclude / storage_options: the [source] table (a single path may be given
    as is; strings keep a trailing slash). api: keys of [api] besides the endpoint; max_retries is
    2 unless given. images / credits / executor: those tables, left out when None. db: [state] db,
    by default "state/NAME.db" (jobs given the same db share one state database). extra: TOML
    text appended as is, for what the keywords do not cover.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    source: dict[str, Any] = {}
    if paths:
        source["paths"] = [str(p) for p in paths]
    if manifest is not None:
        source["manifest"] = manifest
    if exclude:
        source["exclude"] = list(exclude)
    url = endpoint.endpoint_url() if isinstance(endpoint, Sandbox) else endpoint
    tables: list[tuple[str, Mapping[str, Any] | None]] = [
        ("source", source),
        ("source.storage_options", storage_options),
        ("api", {"endpoint": url, "max_retries": 2, **(api or {})}),
        ("images", images),
        ("credits", credits),
        ("executor", executor),
        ("state", {"db": db if db is not None else f"state/{name}.db"}),
    ]
    text = [f"name = {_toml(name)}"]
    for table, keys in tables:
        if keys is not None:
            text.append(f"[{table}]")
            text.extend(f"{k} = {_toml(v)}" for k, v in keys.items())
    text.append(extra)
    job = tmp / f"{name}.toml"
    job.write_text("\n".join(text) + "\n", encoding="utf-8")
    return job


def _toml(value: Any) -> str:
    """A TOML value: strings, booleans, numbers, lists and (inline) tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # A JSON string is a TOML basic string, once DEL is escaped too.
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


# --- images --------------------------------------------------------------------------------------


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG of one colour (Pillow's default quality)."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def bars_jpeg(i: int) -> bytes:
    """A 32x16 JPEG that differs for every i below 65536: the bits of i painted as bars."""
    img = Image.new("RGB", (32, 16), (40, 90, 160))
    for bit in range(16):  # one black or white 2x8 bar per bit survives JPEG's rounding
        if i >> bit & 1:
            img.paste((255, 255, 255), (2 * bit, 0, 2 * bit + 2, 8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(folder: Path, n: int, *, image: Callable[[int], bytes] = bars_jpeg,
                name: str = "img{:04d}.jpg") -> list[Path]:
    """n images image(0) .. image(n - 1), named name.format(i); asserts their bytes all differ."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, digests = [], set()
    for i in range(n):
        data = image(i)
        digests.add(hashlib.sha256(data).digest())
        p = folder / name.format(i)
        p.write_bytes(data)
        paths.append(p)
    assert len(digests) == n, "the generated images must all differ"
    return paths


# --- the emulator --------------------------------------------------------------------------------


def sends(sb: Sandbox) -> Counter[str]:
    """How often the emulator received each record id."""
    return Counter(e.record_id for e in sb.ledger())


def settle(sb: Sandbox, timeout: float = 15) -> list[LedgerEntry]:
    """Wait until the emulator has finished every request of a killed client; returns the ledger.

    The server tracks its open connections; once the client is dead, each one closes as soon as
    its request is answered (or found cut short), so an empty set means the ledger is complete.
    """
    deadline = time.monotonic() + timeout
    while sb.open_connections:
        if time.monotonic() > deadline:
            pytest.fail("the emulator still serves a killed client's requests")
        time.sleep(0.01)
    return sb.ledger()


# --- the console script in a subprocess ----------------------------------------------------------


def ximrun_command() -> list[str]:
    """The installed `ximrun` console script next to this interpreter (`python -m runner`, the
    same entry point, where the environment has no scripts directory)."""
    script = Path(sys.executable).with_name("ximrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "runner"]


def child_env(token: str = TOKEN, **extra: str) -> dict[str, str]:
    """This environment without XIMRUN_* settings, with the token; runner from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIMRUN_")}
    env.update(XIMILAR_TOKEN=token, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Child:
    """`ximrun ...` in a subprocess, its output in files (never a pipe that can fill)."""

    proc: subprocess.Popen
    out: Path
    err: Path
    own_session: bool = False  # the process leads its own process group (killed as a group)

    def wait(self, timeout: float = PROC_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.own_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait()
            pytest.fail(f"ximrun did not exit within {timeout}s: it hangs\n{self.output()}")

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def start(tmp: Path, *args: str, env: dict[str, str] | None = None, tag: str = "run",
          **popen: Any) -> Child:
    """Start `ximrun ARGS` in tmp; its output goes to tmp/TAG-N.out and .err. popen: more
    Popen arguments (stderr=, start_new_session=...)."""
    n = len(list(tmp.glob(f"{tag}-*.out")))
    out, err = tmp / f"{tag}-{n}.out", tmp / f"{tag}-{n}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        kw = {"stderr": fe, **popen}
        proc = subprocess.Popen([*ximrun_command(), *args], cwd=tmp,
                                env=env or child_env(), stdout=fo, stdin=subprocess.DEVNULL,
                                **kw)
    return Child(proc, out, err, own_session=bool(popen.get("start_new_session")))


def ximrun(tmp: Path, *args: str, env: dict[str, str] | None = None, tag: str = "cmd",
           timeout: float = PROC_TIMEOUT_S) -> Child:
    """Run `ximrun ARGS` in a subprocess to its end."""
    c = start(tmp, *args, env=env, tag=tag)
    c.wait(timeout)
    return c


def wait_for(cond: Callable[[], object], what: str, child: Child | None = None,
             timeout: float = 30, interval: float = 0.01) -> None:
    """Poll cond() until it is true; fails on the timeout, or if child exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not cond():
        if child is not None and child.proc.poll() is not None:
            pytest.fail(f"ximrun exited ({child.proc.returncode}) before {what}\n{child.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


# --- the state database from outside -------------------------------------------------------------


def integrity(db: Path, scratch: Path) -> str:
    """integrity_check on a copy of the files as a kill left them (the original is untouched)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for suffix in ("", "-wal"):
        f = db.with_name(db.name + suffix)
        if f.exists():
            shutil.copy(f, scratch / f.name)
    conn = sqlite3.connect(scratch / db.name)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def db_count(db: Path, sql: str) -> int:
    """A `SELECT count(*) ...` read while a run writes, taking no part in its writes; 0 before
    the database or its schema exists."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def attempts_per_key(db: Path) -> Counter[str]:
    """How many `attempts` rows (HTTP requests) named each key."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return Counter(k for (keys,) in conn.execute("SELECT keys FROM attempts")
                       for k in json.loads(keys))
    finally:
        conn.close()
