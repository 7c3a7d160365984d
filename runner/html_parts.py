"""The pieces of `ximrun report`'s page that do not read the database: captions, the SVG of boxes
and of the runs chart, the page's style and script."""

from __future__ import annotations

import html
import sqlite3
from typing import Any


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def answer_caption(record: Any) -> str:
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


def boxes_svg(record: dict[str, Any], frame: tuple[int, int]) -> str:
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


def runs_svg(rows: list[sqlite3.Row]) -> str:
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


CSS = """
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
SCRIPT = """
(function(){
function check(){var imgs=document.querySelectorAll('.thumb img'),bad=0;
for(var i=0;i<imgs.length;i++){var im=imgs[i];if(!(im.complete&&im.naturalWidth>0))bad++;}
document.body.dataset.thumbsLoaded=(bad?'broken ':'ok ')+imgs.length;}
if(document.readyState==='complete')check();else window.addEventListener('load',check);
})();
"""
