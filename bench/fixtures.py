"""What the benchmarks share: generated images, job files, memory readings and the result table.

Every benchmark reports figures as ratios against a baseline measured in the same run, because
the machines are shared and noisy; a `Figure` is one such ratio (or reading) and its goal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKEN_ENV = "XIMRUN_BENCH_TOKEN"


def set_bench_token() -> tuple[str, Callable[[], None]]:
    """A fresh token in TOKEN_ENV for this process; returns it and how to put the old value back."""
    import secrets

    token = secrets.token_hex(8)
    old = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = token

    def restore() -> None:
        if old is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old

    return token, restore
FILES_PER_FOLDER = 1000  # generated trees are spread so that no folder gets huge


@dataclass(frozen=True)
class Figure:
    """One reported figure: `value` rendered with `fmt`, the goal in words, and whether it is met."""

    bench: str
    label: str
    value: float
    fmt: str
    goal: str
    met: bool | None  # None: reported, no goal

    def render(self) -> str:
        return format(self.value, self.fmt)


def print_figures(figures: list[Figure], title: str | None = None) -> None:
    if title:
        print(title)
    width = max((len(f"{f.bench}: {f.label}") for f in figures), default=10)
    for f in figures:
        verdict = "" if f.met is None else ("met" if f.met else "MISSED")
        print(f"  {f.bench + ': ' + f.label:<{width}}  {f.render():>10}  {f.goal:<14} {verdict}")


def all_met(figures: list[Figure]) -> bool:
    return all(f.met is not False for f in figures)


# --- images ------------------------------------------------------------------------------------


def tree_path(root: Path, i: int, suffix: str = ".jpg") -> Path:
    return root / f"{i // FILES_PER_FOLDER:05d}" / f"{i:08d}{suffix}"


def write_tiny_jpegs(root: Path, n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> float:
    """n distinct small JPEGs (smooth colour blobs plus a little noise); returns seconds taken."""
    from PIL import Image

    rng = random.Random(seed)
    started = time.perf_counter()
    noise = [Image.effect_noise(size, 12).convert("RGB") for _ in range(8)]
    for i in range(n):
        if i % FILES_PER_FOLDER == 0:
            tree_path(root, i).parent.mkdir(parents=True, exist_ok=True)
        # 6x4 random colours blown up: distinct per image and compressible like a thumbnail.
        blobs = Image.frombytes("RGB", (6, 4), rng.randbytes(72)).resize(size, Image.BILINEAR)
        im = Image.blend(blobs, noise[i % len(noise)], 0.15)
        buf = BytesIO()
        im.save(buf, "JPEG", quality=85)
        tree_path(root, i).write_bytes(buf.getvalue())
    return time.perf_counter() - started


def write_tiny_files(root: Path, n: int, data: bytes = b"\xff\xd8\xff") -> float:
    """n files of a few bytes each, as cheaply as the file system allows; returns seconds."""
    started = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for i in range(n):
        path = tree_path(root, i)
        if i % FILES_PER_FOLDER == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return time.perf_counter() - started


# --- jobs --------------------------------------------------------------------------------------


def write_job(folder: Path, *, name: str, images: Path, endpoint: str = "sandbox",
              concurrency: int = 8, batch_size: int = 10, db: str = "state.db",
              extra: str = "") -> Path:
    """A job file over a folder of images; a URL endpoint reads its token from TOKEN_ENV."""
    api = f'endpoint = "{endpoint}"\n'
    if endpoint != "sandbox":
        api += f'token_env = "{TOKEN_ENV}"\n'
    text = (f'name = "{name}"\n\n[source]\npaths = ["{images.as_posix()}/"]\n\n'
            f"[api]\n{api}batch_size = {batch_size}\nconcurrency = {concurrency}\n\n"
            f'[state]\ndb = "{db}"\n{extra}')
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the emulator ---


@contextlib.contextmanager
def lean_emulator(analysis: bool) -> Iterator[None]:
    """The emulator minus what only measures the emulator: Nagle's delay on its sockets
    (http.server writes headers and body apart, so each answer waits for the client's delayed
    ACK, about 40 ms) and, unless `analysis`, its pixel analysis of every record (work the real
    API does on its own machines), replaced by a header read."""
    from PIL import Image

    from runner.sandbox import server, service
    from runner.sandbox.results import Picture

    def header_only(data: bytes) -> Picture | None:
        try:
            with Image.open(BytesIO(data)) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 -- the emulator's own answer to bytes it cannot open
            return None
        return Picture(w, h, hashlib.sha256(data).digest(), (0, 0, w, h),
                       (((128, 128, 128), 1.0),), 128.0)

    nagle, read_picture = server._Handler.disable_nagle_algorithm, service.read_picture
    server._Handler.disable_nagle_algorithm = True
    if not analysis:
        service.read_picture = header_only
    try:
        yield
    finally:
        server._Handler.disable_nagle_algorithm = nagle
        service.read_picture = read_picture


@contextlib.contextmanager
def emulator_process(*, latency_ms: float, token: str, analysis: bool = False,
                     max_records: int = 10) -> Iterator[str]:
    """The lean emulator served by a child process (bench/emulator.py); yields its endpoint URL."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "bench.emulator", "--latency-ms", str(latency_ms),
            "--token", token, "--max-records", str(max_records)]
    if analysis:
        args.append("--analysis")
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=child_env(), text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        if len(line) != 2 or line[0] != "endpoint":
            raise SystemExit(f"the emulator process did not start (said {line!r})")
        yield line[1]
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# --- memory ------------------------------------------------------------------------------------


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass  # not Linux: the caller falls back to ru_maxrss
    return None


def peak_kb() -> int:
    """The process's peak RSS: VmHWM, or ru_maxrss where /proc is missing."""
    import resource

    return status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cpu_seconds(who: str = "self") -> float:
    """CPU time (user + system) of this process, or ("children") of its children that ended
    and were waited for: a process pool's workers once it has shut down, not the emulator."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN if who == "children"
                               else resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ThreadCPU:
    """The CPU time of this process's threads, summed by name (numbers at the end dropped:
    `send_3` counts as `send`), read every `interval` from the kernel's per-thread run time
    (/proc/self/task/<tid>/schedstat, in nanoseconds). A thread's last reading stands for it,
    so the little it spends after that is lost (pool threads end idle). Empty where there is
    no such file (not Linux).

    Reading costs CPU in the measured process: `own_s` is what the readings cost over the
    block, for the caller to leave out of the process's figure. Each thread's file stays open
    and is read again from its start (1.3 us a reading, against 18 us for opening it each time:
    with 50 threads read every 10 ms, that was about 7 % of a core)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.own_s = 0.0  # CPU seconds the readings cost, on any thread
        self._last: dict[threading.Thread, float] = {}  # thread -> its CPU seconds
        self._start: dict[threading.Thread, float] = {}
        self._files: dict[int, tuple[threading.Thread, int]] = {}  # native id -> (thread, fd)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-sampler", daemon=True)

    def __enter__(self) -> ThreadCPU:
        started = time.thread_time()
        self._read()
        self._start = dict(self._last)
        self.own_s = time.thread_time() - started
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        started = time.thread_time()
        self._read()
        for _, fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self.own_s += time.thread_time() - started

    def by_name(self) -> dict[str, float]:
        """Seconds of CPU per kind of thread over the block, the most first."""
        out: dict[str, float] = {}
        for t, seconds in self._last.items():
            spent = seconds - self._start.get(t, 0.0)
            kind = re.sub(r"[-_]?\d+$", "", t.name.split(" ")[0]) or t.name
            out[kind] = out.get(kind, 0.0) + spent
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _sample(self) -> None:
        started = time.thread_time()
        while not self._stop.wait(self.interval):
            self._read()
        self.own_s += time.thread_time() - started  # read by __exit__ after the join

    def _read(self) -> None:
        for t in threading.enumerate():
            tid = t.native_id
            if tid is None or t is self._thread:
                continue
            seconds = self._seconds(t, tid)
            if seconds is not None:
                self._last[t] = seconds

    def _seconds(self, t: threading.Thread, tid: int) -> float | None:
        opened = self._files.get(tid)
        if opened is not None and opened[0] is not t:  # the id of a thread that has ended
            os.close(opened[1])
            del self._files[tid]
            opened = None
        try:
            if opened is None:
                fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                self._files[tid] = (t, fd)
            else:
                fd = opened[1]
            return int(os.pread(fd, 64, 0).split()[0]) / 1e9
        except (OSError, ValueError, IndexError):  # ended meanwhile, or no such file here
            stale = self._files.pop(tid, None)
            if stale is not None:
                os.close(stale[1])
            return None


def child_env() -> dict[str, str]:
    """The environment for a benchmark's child process: this checkout first on the path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
