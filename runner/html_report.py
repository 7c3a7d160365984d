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
import io
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from runner.errors import RunnerError, StateError
from runner.job import Job
from runner.records import DONE, FAILED, PENDING, REJECTED, STATES, Item
from runner.schema import REASON_GROUP_SQL

DEFAULT_SAMPLE = 300  # done images shown
PER_REASON = 200  # thumbnails per reason group of failed or rejected images
THUMB_SIDE = 160  # pixels, the longer side
THUMB_QUALITY = 70
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
        except _NoThumb as exc:
            return None, str(exc)
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"), ""


class _NoThumb(Exception):
    pass


def thumbnail(data: bytes, side: int, max_pixels: int,
              frame: tuple[int, int] | None = None) -> bytes:
    """A JPEG at most side x side of the image's first frame. `frame`: the (width, height) the
    API saw; the orientation (EXIF applied or not) that matches its shape is kept, so that boxes
    in its pixels fall in place. Raises _NoThumb with the reason it cannot be made."""
    from PIL import Image, ImageOps

    from runner.images import _DECODERS, SNIFF_BYTES, sniff_format

    if not data:
        raise _NoThumb("cannot be shown: empty")
    fmt = sniff_format(data[:SNIFF_BYTES])
    decoders = [d for d in _DECODERS.get(fmt or "", ()) if d in Image.OPEN]
    if not decoders:
        raise _NoThumb(f"cannot be shown: {'no decoder for ' + fmt if fmt else 'not an image'}")
    for decoder in decoders:
        try:
            with Image.open(io.BytesIO(data), formats=(decoder,)) as im:
                w, h = im.size
                if w <= 0 or h <= 0 or w * h > max_pixels:
                    raise _NoThumb("cannot be shown: too large to decode")
                if fmt == "jpeg":
                    im.draft("RGB", (side, side))
                im.load()
                shown = ImageOps.exif_transpose(im)
                if frame and _aspect_off(shown.size, frame) > _aspect_off(im.size, frame):
                    shown = im
                shown = _rgb(shown)
                shown.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                buf = io.BytesIO()
                shown.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
                return buf.getvalue()
        except _NoThumb:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise _NoThumb("cannot be shown: too large to decode") from None
        except Exception:  # noqa: BLE001,S112 -- bad content: the next decoder, else the placeholder
            continue
    raise _NoThumb(f"cannot be shown: the {fmt} data does not decode")


def _aspect_off(size: tuple[int, int], frame: tuple[int, int]) -> float:
    return abs(size[0] / max(size[1], 1) - frame[0] / max(frame[1], 1))


def _rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        back = Image.new("RGB", rgba.size, (255, 255, 255))
        back.paste(rgba, mask=rgba.getchannel("A"))
        return back
    if im.mode == "I;16" or im.mode == "I" or im.mode == "F":
        return im.point(lambda v: v / 256).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


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
               f"<title>ximrun report: {_e(s['job'])}</title><style>{_CSS}</style></head>"
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
               f" from {_e(s['db'])}</footer>\n<script>{_SCRIPT}</script>\n</body></html>\n")

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
        self.w(_runs_svg(rows))
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
        for chunk in _chunks(_dicts(cur), CHUNK):
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
        for chunk in _chunks(rows, CHUNK):
            for r, thumb in zip(chunk, self.thumbs.make(chunk), strict=True):
                self._card(r, thumb, caption=None if state == DONE else "not answered yet")
        self.w("</div></section>\n")

    def _rows_by_rowid(self, rowids: list[int]) -> Iterator[dict[str, Any]]:
        for chunk in _chunks(rowids, 500):
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
                picture += _boxes_svg(record, frame)
            picture = f"<span class=\"pic\">{picture}</span>"
        else:
            self.stats.placeholders += 1
            picture = f"<div class=\"placeholder\">{_e(why)}</div>"
        if caption is None:
            caption = _answer_caption(record)
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


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _answer_caption(record: Any) -> str:
    """The best match, the best label or the tags: what the API said, in a few words."""
    if not isinstance(record, dict):
        return ""
    parts: list[str] = []
    objects = record.get("_objects") if isinstance(record.get("_objects"), list) else []
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        best = (obj.get("_identification") or {}).get("best_match") \
            if isinstance(obj.get("_identification"), dict) else None
        if isinstance(best, dict) and best.get("name"):
            extra = " ".join(str(best[k]) for k in ("set_code", "card_number") if best.get(k))
            parts.append(f"{best['name']}" + (f" ({extra})" if extra else ""))
    label = record.get("best_label")
    if isinstance(label, dict) and label.get("name"):
        parts.append(str(label["name"]))
    elif isinstance(label, str):
        parts.append(label)
    if not parts:
        parts.extend(_tag_names(record.get("_tags"))[:3])
    if not parts:
        for obj in objects:
            if isinstance(obj, dict):
                parts.extend(_tag_names(obj.get("_tags"))[:2])
    if not parts and objects:
        parts.append(", ".join(str(o.get("name")) for o in objects
                               if isinstance(o, dict) and o.get("name")))
    return "; ".join(p for p in parts if p) or "(no label)"


def _tag_names(tags: Any) -> list[str]:
    names: list[str] = []
    if isinstance(tags, dict):
        for values in tags.values():
            if isinstance(values, list):
                names.extend(str(v["name"]) for v in values if isinstance(v, dict) and "name" in v)
    elif isinstance(tags, list):
        names.extend(str(v.get("name", v)) if isinstance(v, dict) else str(v) for v in tags)
    return names


def _boxes_svg(record: dict[str, Any], frame: tuple[int, int]) -> str:
    """The objects' boxes over the thumbnail: drawn in the API's pixels, stretched to the image."""
    w, h = frame
    shapes: list[str] = []
    objects = record.get("_objects") if isinstance(record.get("_objects"), list) else []
    stroke = max(w, h) / 80
    for obj in objects:
        box = obj.get("bound_box") if isinstance(obj, dict) else None
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            continue
        x1, y1, x2, y2 = box
        label = obj.get("name") or ""
        best = obj.get("_identification", {}).get("best_match") \
            if isinstance(obj.get("_identification"), dict) else None
        if isinstance(best, dict) and best.get("name"):
            label = best["name"]
        font = max(w, h) / 14
        shapes.append(
            f"<rect x=\"{x1}\" y=\"{y1}\" width=\"{max(x2 - x1, 0)}\" height=\"{max(y2 - y1, 0)}\" "
            f"stroke-width=\"{stroke:.1f}\"/>"
            f"<text x=\"{x1 + stroke}\" y=\"{y1 + font}\" font-size=\"{font:.0f}\">{_e(label)}</text>")
    if not shapes:
        return ""
    return (f"<svg class=\"boxes\" viewBox=\"0 0 {w} {h}\" preserveAspectRatio=\"none\" "
            f"aria-hidden=\"true\">{''.join(shapes)}</svg>")


def _runs_svg(rows: list[sqlite3.Row]) -> str:
    """Credits (bars) and images settled (bars beside them) per run, each on its own scale."""
    n = len(rows)
    width, height, left, bottom, top = 760, 200, 40, 36, 16
    slot = (width - left - 10) / n
    bar = max(min(slot * 0.38, 28), 1.5)
    max_credits = max((r["credits"] or 0) for r in rows) or 1
    images = [(r["done"] or 0) + (r["failed"] or 0) + (r["rejected"] or 0) for r in rows]
    max_images = max(images) or 1
    plot = height - bottom - top
    out = [f"<svg class=\"chart\" viewBox=\"0 0 {width} {height}\" role=\"img\" "
           "aria-label=\"credits and images per run\">",
           f"<line x1=\"{left}\" y1=\"{height - bottom}\" x2=\"{width - 5}\" "
           f"y2=\"{height - bottom}\" class=\"axis\"/>"]
    for i, (r, imgs) in enumerate(zip(rows, images, strict=True)):
        x = left + i * slot + slot / 2
        hc = plot * (r["credits"] or 0) / max_credits
        hi = plot * imgs / max_images
        tip = (f"run #{r['id']} {r['started_at']} {r['status']} (exit {r['exit_code']}): "
               f"credits {r['credits'] or 0}, saved {r['credits_saved'] or 0}; images done "
               f"{r['done'] or 0}, failed {r['failed'] or 0}, rejected {r['rejected'] or 0}, "
               f"reused {r['reused'] or 0}")
        out.append(f"<g><title>{_e(tip)}</title>"
                   f"<rect class=\"credits\" x=\"{x - bar:.1f}\" y=\"{height - bottom - hc:.1f}\" "
                   f"width=\"{bar:.1f}\" height=\"{hc:.1f}\"/>"
                   f"<rect class=\"images\" x=\"{x:.1f}\" y=\"{height - bottom - hi:.1f}\" "
                   f"width=\"{bar:.1f}\" height=\"{hi:.1f}\"/>")
        if n <= 20 or i % max(1, n // 10) == 0:
            out.append(f"<text x=\"{x:.1f}\" y=\"{height - bottom + 14}\" "
                       f"text-anchor=\"middle\">#{r['id']}</text>")
        out.append("</g>")
    out.append(f"<text x=\"{left}\" y=\"{height - 6}\" class=\"legend\">"
               f"<tspan class=\"credits\">&#9632;</tspan> credits (max {max_credits:,}) "
               f"<tspan class=\"images\">&#9632;</tspan> images settled (max {max_images:,})"
               "</text></svg>")
    return "".join(out)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:12px 20px;color:#1d2330;background:#fafbfc}
h1{margin:.2em 0 0}h2{margin:1.2em 0 .4em;border-bottom:1px solid #dde;padding-bottom:4px}
h3{margin:.8em 0 .3em;font-size:15px}h3 small{color:#667;font-weight:normal}
.sub,.note,footer{color:#667}footer{margin:2em 0 1em;font-size:12px}
code{font-size:12px;word-break:break-all}
.totals{display:flex;flex-wrap:wrap;gap:8px;margin-top:12px}
.tile{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 14px;min-width:90px}
.tile b{display:block;font-size:22px}.tile span{color:#556;font-size:12px}
.tile.done b{color:#1a7f37}.tile.failed b{color:#c62828}.tile.rejected b{color:#b26a00}
.tile.pending b{color:#3559b7}.tile.warn{border-color:#c62828}
.chart{width:100%;max-width:760px;height:auto;background:#fff;border:1px solid #dde;
border-radius:6px}.chart text{font-size:11px;fill:#556}.chart .axis{stroke:#99a}
.chart rect.credits,.chart tspan.credits{fill:#e59f1a}.chart rect.images,
.chart tspan.images{fill:#3b7dd8}
.reasons{columns:2;padding-left:18px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:5px;overflow:hidden}
.card[open]{grid-column:1/-1}.card summary{list-style:none;cursor:pointer}
.card summary::-webkit-details-marker{display:none}
.thumb{position:relative;width:160px;height:160px;margin:0 auto;display:flex;
align-items:center;justify-content:center}
.thumb img{display:block;max-width:160px;max-height:160px}
.pic{position:relative;display:inline-block;line-height:0}
.boxes{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
.boxes rect{fill:none;stroke:#ff2d55}.boxes text{fill:#fff;paint-order:stroke;stroke:#000;
stroke-width:2px;font-family:sans-serif}
.placeholder{width:150px;height:150px;border:2px dashed #c9ccd6;border-radius:4px;color:#667;
font-size:12px;display:flex;align-items:center;justify-content:center;text-align:center;
padding:4px;box-sizing:border-box;word-break:break-word;overflow:hidden}
.key{font-size:12px;font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.caption{font-size:12px;color:#445;overflow-wrap:anywhere}
.record pre{background:#f3f4f8;padding:8px;border-radius:4px;overflow:auto;max-height:420px;
font-size:12px}
.group.small{display:inline-block;vertical-align:top;margin-right:14px}
.group.small h3{max-width:520px;overflow-wrap:anywhere}
.more{margin:8px 0}.keys{font-size:12px;max-height:400px;overflow:auto}
"""

# Once the page is loaded, a marker that every thumbnail decoded (what the browser test reads:
# data-thumbs-loaded="ok N" or "broken N"). The page needs no script otherwise.
_SCRIPT = """
(function(){
function check(){var imgs=document.querySelectorAll('.thumb img'),bad=0;
for(var i=0;i<imgs.length;i++){var im=imgs[i];if(!(im.complete&&im.naturalWidth>0))bad++;}
document.body.dataset.thumbsLoaded=(bad?'broken ':'ok ')+imgs.length;}
if(document.readyState==='complete')check();else window.addEventListener('load',check);
})();
"""
