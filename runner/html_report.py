"""`ximrun report`: one self-contained HTML page of a job's state database.

Everything is inline (styles, the one small script, thumbnails as data: URIs), so the file opens
in any browser with no network. Rows are streamed from SQLite and written as they come: only one
chunk of thumbnails is held at a time, so a job of any size builds in flat memory. Thumbnails are
made now, from the sources, with the runner's own readers (storage.read_many, the decoders of
images.py); an image that cannot be read or decoded any more gets a placeholder that says why.

`write_report` raises, never exits (docs/python-api.md).
"""

from __future__ import annotations

import base64
import html
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from runner.errors import RunnerError, StateError
from runner.html_parts import CSS, SCRIPT, answer_caption, boxes_svg, runs_svg
from runner.images import ThumbnailError, thumbnail
from runner.job import Job
from runner.records import DONE, FAILED, PENDING, REJECTED, STATES, Item
from runner.schema import REASON_GROUP_SQL
from runner.sources import iter_chunks

DEFAULT_SAMPLE = 300  # done images shown
PER_REASON = 200  # thumbnails per reason group of failed or rejected images
THUMB_SIDE = 160  # pixels, the longer side
CHUNK = 32  # rows whose thumbnails are made (and held) at once
MAX_RUNS_CHARTED = 60  # the latest runs in the chart


@dataclass
class ReportStats:
    """What went into the page: counts of images shown and how long it took."""

    path: Path
    images_shown: int = 0
    thumbnails: int = 0
    placeholders: int = 0
    listed_without_thumbnail: int = 0
    seconds: float = 0.0
    bytes: int = 0


def write_report(job: Job, output: str | os.PathLike[str], *, sample: int = DEFAULT_SAMPLE,
                 state: str | None = None, per_reason: int = PER_REASON,
                 thumb_side: int = THUMB_SIDE) -> ReportStats:
    """Write the job's HTML report to `output` (atomically: a temporary file beside it, then
    renamed). `sample`: how many done (or, with state="pending", pending) images to show;
    `state`: only that state's section; `per_reason`: thumbnails per group of failed or rejected
    images (the others are listed by key). Raises StateError when nothing has run yet, or
    RunnerError when the file cannot be written."""
    if state is not None and state not in STATES:
        raise RunnerError(f"report: unknown state {state!r} (one of {', '.join(STATES)})")
    if sample < 0 or per_reason < 0:
        raise RunnerError("report: --sample and the per-reason cap cannot be negative")
    if not job.db_path.exists():
        raise StateError(f"no state database yet at {job.db_path} (nothing has run)")
    from runner.report import status_report

    started = time.monotonic()
    out = Path(output)
    stats = ReportStats(out)
    summary = status_report(job)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise RunnerError(f"report: cannot write in {folder}: {exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh, _Thumbnailer(job, thumb_side) as thumbs:
            conn = sqlite3.connect(f"file:{job.db_path}?mode=ro", uri=True, timeout=30)
            conn.row_factory = sqlite3.Row
            try:
                _Page(fh, job, conn, summary, thumbs, stats).write(
                    sample=sample, state=state, per_reason=per_reason)
            finally:
                conn.close()
        os.replace(tmp_name, out)
    except OSError as exc:
        _unlink(tmp_name)
        raise RunnerError(f"report: cannot write {out}: {exc}") from None
    except BaseException:
        _unlink(tmp_name)
        raise
    stats.seconds = time.monotonic() - started
    stats.bytes = out.stat().st_size
    return stats


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


_GROUP_SQL = REASON_GROUP_SQL  # the same groups as the failures_by_reason view


# --- thumbnails --------------------------------------------------------------------------------


class _Thumbnailer:
    """Small JPEGs (as data: URIs) from the sources, a chunk at a time, on a few threads."""

    def __init__(self, job: Job, side: int) -> None:
        self.job = job
        self.side = side
        self.pool = ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2)),
                                       thread_name_prefix="ximrun-thumb")

    def __enter__(self) -> _Thumbnailer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def make(self, rows: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
        """For each row: (a data: URI or None, the reason there is none)."""
        from runner.storage import read_many

        items = [Item(r["key"], r["uri"] or r["key"], r["size"], r["fingerprint"] or "")
                 for r in rows]
        try:
            datas: list[Any] = read_many(items, self.job.source)
        except Exception as exc:  # noqa: BLE001 -- a storage that fails as a whole: placeholders
            datas = [exc] * len(items)
        return list(self.pool.map(self._one, datas, rows))

    def _one(self, data: Any, row: dict[str, Any]) -> tuple[str | None, str]:
        if isinstance(data, BaseException):
            return None, f"cannot be read any more: {data}"
        try:
            jpeg = thumbnail(data, self.side, self.job.images.max_pixels,
                             _record_size(row.get("record")))
        except ThumbnailError as exc:
            return None, str(exc)
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"), ""


def _record_size(record: Any) -> tuple[int, int] | None:
    if isinstance(record, dict):
        w, h = record.get("_width"), record.get("_height")
        if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
            return int(w), int(h)
    return None


# --- the page ----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(key: str) -> str:
    """The file name of a key (what is after the last '/'), for captions."""
    return key.rstrip("/").rsplit("/", 1)[-1] or key


class _Page:
    def __init__(self, fh: TextIO, job: Job, conn: sqlite3.Connection, summary: dict[str, Any],
                 thumbs: _Thumbnailer, stats: ReportStats) -> None:
        self.fh, self.job, self.conn, self.summary = fh, job, conn, summary
        self.thumbs, self.stats = thumbs, stats

    def w(self, text: str) -> None:
        self.fh.write(text)

    def write(self, *, sample: int, state: str | None, per_reason: int) -> None:
        s = self.summary
        self.w("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
               "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
               f"<title>ximrun report: {_e(s['job'])}</title><style>{CSS}</style></head>"
               "<body>\n")
        self._header()
        self._runs_chart()
        for st in (FAILED, REJECTED):
            if state in (None, st):
                self._grouped(st, per_reason)
        if state in (None, DONE):
            self._sample(DONE, sample)
        if state == PENDING:
            self._sample(PENDING, sample)
        self.w(f"<footer>made by ximrun at {_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}"
               f" from {_e(s['db'])}</footer>\n<script>{SCRIPT}</script>\n</body></html>\n")

    # header and totals

    def _header(self) -> None:
        s = self.summary
        st, c = s["states"], s["credits"]
        total = sum(st.values())
        self.w(f"<header><h1>{_e(s['job'])}</h1><p class=\"sub\">state database "
               f"<code>{_e(s['db'])}</code>, {total:,} image(s)</p></header>\n<section "
               "class=\"totals\">")
        for name in STATES:
            self.w(f"<div class=\"tile {name}\"><b>{st[name]:,}</b><span>{name}</span></div>")
        self.w(f"<div class=\"tile\"><b>{s['missing']:,}</b><span>missing</span></div>"
               f"<div class=\"tile\"><b>{c['recorded']:,}</b><span>credits recorded</span></div>"
               f"<div class=\"tile\"><b>{c['saved_by_reuse']:,}</b><span>credits saved by reuse "
               f"({s['reused']:,} image(s))</span></div>")
        unanswered = s["possibly_billed_without_answer"]
        if unanswered:
            keys = {k for u in unanswered for k in u["keys"]}
            self.w(f"<div class=\"tile warn\"><b>{len(keys):,}</b><span>possibly billed "
                   "without an answer</span></div>")
        self.w("</section>\n")

    def _runs_chart(self) -> None:
        rows = self.conn.execute(
            "SELECT id, started_at, status, exit_code, credits, credits_saved, done, failed, "
            "rejected, reused, sent FROM runs WHERE job = ? ORDER BY id DESC LIMIT ?",
            (self.job.name, MAX_RUNS_CHARTED)).fetchall()[::-1]
        self.w("<section><h2>Runs</h2>")
        if not rows:
            self.w("<p>No run yet.</p></section>\n")
            return
        self.w(runs_svg(rows))
        n_runs = self.conn.execute("SELECT count(*) FROM runs WHERE job = ?",
                                   (self.job.name,)).fetchone()[0]
        if n_runs > len(rows):
            self.w(f"<p class=\"note\">The latest {len(rows)} of {n_runs:,} runs.</p>")
        self.w("</section>\n")

    # failed and rejected images, grouped by reason

    def _grouped(self, state: str, per_reason: int) -> None:
        groups = self.conn.execute(
            f"SELECT {_GROUP_SQL} AS grp, count(*) AS n FROM items WHERE job = ? AND state = ? "
            "GROUP BY grp ORDER BY n DESC, grp", (self.job.name, state)).fetchall()
        total = sum(g["n"] for g in groups)
        self.w(f"<section id=\"{state}\"><h2>{state.capitalize()}: {total:,} image(s)"
               f"{' by reason' if total else ''}</h2>")
        if not total:
            self.w("<p>None.</p></section>\n")
            return
        sizes = {g["grp"]: g["n"] for g in groups}
        self.w("<ul class=\"reasons\">" + "".join(
            f"<li><a href=\"#{state}-{i}\">{_e(g['grp'])}</a> <b>{g['n']:,}</b></li>"
            for i, g in enumerate(groups)) + "</ul>")
        # One ordered pass over the state's rows, largest group first as in the list above; the
        # window numbers the rows of each group, so that those past the thumbnail cap come back
        # without their record.
        cur = self.conn.execute(
            "SELECT key, uri, size, fingerprint, reason, grp, rn, "
            "CASE WHEN rn <= ? THEN result END AS result FROM ("
            f"SELECT key, uri, size, fingerprint, reason, result, {_GROUP_SQL} AS grp, "
            f"row_number() OVER (PARTITION BY {_GROUP_SQL} ORDER BY key) AS rn, "
            f"count(*) OVER (PARTITION BY {_GROUP_SQL}) AS n "
            "FROM items WHERE job = ? AND state = ?) ORDER BY n DESC, grp, rn",
            (per_reason, self.job.name, state))
        order = {g["grp"]: i for i, g in enumerate(groups)}
        current: str | None = None
        in_list = False
        for chunk in iter_chunks(_dicts(cur), CHUNK):
            with_thumbs = [r for r in chunk if r["rn"] <= per_reason]
            made = iter(self.thumbs.make(with_thumbs)) if with_thumbs else iter(())
            for r in chunk:
                if r["grp"] != current:
                    if current is not None:
                        self.w("</ul></details>" if in_list else "</div>")
                        self.w("</div>")
                    current, in_list = r["grp"], False
                    n = sizes.get(current, 0)
                    # Groups of a few images sit side by side; bigger ones take the width.
                    small = 0 < min(n, per_reason) <= 3
                    cols = f" style=\"grid-template-columns:repeat({min(n, per_reason)},170px)\"" \
                        if small else ""
                    self.w(f"<div class=\"group{' small' if small else ''}\" "
                           f"id=\"{state}-{order.get(current, 0)}\"><h3>{_e(current)} <small>"
                           f"{n:,} image(s)"
                           + (f", thumbnails of the first {per_reason:,}" if n > per_reason
                              else "") + f"</small></h3><div class=\"grid\"{cols}>")
                if r["rn"] <= per_reason:
                    self._card(r, next(made), caption=r["reason"] or "")
                else:
                    if not in_list:
                        self.w("</div><details class=\"more\"><summary>"
                               f"{sizes.get(current, 0) - per_reason:,} more (key and reason)"
                               "</summary><ul class=\"keys\">")
                        in_list = True
                    self.w(f"<li><code>{_e(r['key'])}</code> {_e(r['reason'] or '')}</li>")
                    self.stats.listed_without_thumbnail += 1
        if current is not None:
            self.w("</ul></details>" if in_list else "</div>")
            self.w("</div>")
        self.w("</section>\n")

    # done (or pending) images: a sample, spread over the whole job

    def _sample(self, state: str, sample: int) -> None:
        total = self.conn.execute("SELECT count(*) FROM items WHERE job = ? AND state = ?",
                                  (self.job.name, state)).fetchone()[0]
        shown = min(sample, total)
        what = "a sample of " if shown < total else ""
        self.w(f"<section id=\"{state}\"><h2>{state.capitalize()}: {total:,} image(s)"
               + (f", {what}{shown:,} shown" if total else "") + "</h2>")
        if not shown:
            self.w("<p>None shown.</p></section>\n" if total else "<p>None.</p></section>\n")
            return
        # A fixed, spread-out choice (a multiplicative hash of the rowid), the same on every
        # build: only the rowids are sorted, the rows are read afterwards in key order.
        rowids = [r[0] for r in self.conn.execute(
            "SELECT rowid FROM items WHERE job = ? AND state = ? "
            "ORDER BY (rowid * 2654435761) % 4294967296 LIMIT ?", (self.job.name, state, shown))]
        rows = self._rows_by_rowid(sorted(rowids))
        self.w("<div class=\"grid\">")
        for chunk in iter_chunks(rows, CHUNK):
            for r, thumb in zip(chunk, self.thumbs.make(chunk), strict=True):
                self._card(r, thumb, caption=None if state == DONE else "not answered yet")
        self.w("</div></section>\n")

    def _rows_by_rowid(self, rowids: list[int]) -> Iterator[dict[str, Any]]:
        for chunk in iter_chunks(rowids, 500):
            marks = ",".join("?" * len(chunk))
            cur = self.conn.execute(
                f"SELECT key, uri, size, fingerprint, reason, reused_from, credits, result "
                f"FROM items WHERE rowid IN ({marks}) ORDER BY key", chunk)
            yield from _dicts(cur)

    # one image

    def _card(self, r: dict[str, Any], thumb: tuple[str | None, str],
              caption: str | None) -> None:
        record = r.get("record")
        uri, why = thumb
        self.stats.images_shown += 1
        frame = _record_size(record)
        if uri is not None:
            self.stats.thumbnails += 1
            picture = f"<img src=\"{uri}\" alt=\"{_e(_short(r['key']))}\">"
            if frame is not None and isinstance(record, dict):
                picture += boxes_svg(record, frame)
            picture = f"<span class=\"pic\">{picture}</span>"
        else:
            self.stats.placeholders += 1
            picture = f"<div class=\"placeholder\">{_e(why)}</div>"
        if caption is None:
            caption = answer_caption(record)
            if r.get("reused_from"):
                caption += " (reused)"
        body = json.dumps(record, indent=2, ensure_ascii=False) if record is not None \
            else "no record stored"
        self.w(f"<details class=\"card\"><summary><div class=\"thumb\">{picture}</div>"
               f"<div class=\"key\" title=\"{_e(r['key'])}\">{_e(_short(r['key']))}</div>"
               f"<div class=\"caption\">{_e(caption)}</div></summary>"
               f"<div class=\"record\"><p><code>{_e(r['key'])}</code></p>"
               + (f"<p>{_e(r['reason'])}</p>" if r.get("reason") else "")
               + (f"<p>answer reused from <code>{_e(r['reused_from'])}</code></p>"
                  if r.get("reused_from") else "")
               + f"<pre>{_e(body)}</pre></div></details>")


def _dicts(cur: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    for row in cur:
        d = dict(row)
        raw = d.pop("result", None)
        try:
            d["record"] = json.loads(raw) if raw else None
        except ValueError:
            d["record"] = raw
        yield d


