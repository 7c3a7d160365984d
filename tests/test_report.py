"""`ximrun report`: one self-contained HTML page, checked as text and in a real headless browser."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from driver import TOKEN, invoke, jpeg, make_images, run_json, write_job
from PIL import Image

import runner
from runner.job import SandboxSettings, load_job
from runner.sandbox import Sandbox


@pytest.fixture
def ran(tmp_path: Path, sample_data: Path) -> Path:
    """The demo's images, plus images the API refuses, run once; one done image deleted after."""
    imgs = tmp_path / "imgs"
    shutil.copytree(sample_data, imgs, ignore=shutil.ignore_patterns("*.md"))
    for i in range(4):
        (imgs / f"extra{i}.jpg").write_bytes(jpeg((40 * i, 90, 200 - 30 * i), (120, 90)))
    # prefuse refuses a fixed share of image contents: some images end failed with an API reason.
    with Sandbox(SandboxSettings(token=TOKEN, prefuse=0.3, seed=3)) as sb:
        job = write_job(tmp_path, sb, imgs, api={"batch_size": 5})
        summary = run_json(job, exit_code=1)
    assert summary["failed"] >= 1 and summary["done"] >= 3
    return job


def _page(job: Path, tmp: Path, *args: str) -> str:
    out = tmp / "report.html"
    res = invoke("report", str(job), "-o", str(out), *args)
    assert res.exit_code == 0, res.output
    return out.read_text(encoding="utf-8")


def _states(job: Path) -> dict[str, list[dict]]:
    res = invoke("export", str(job))
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["state"], []).append(r)
    return out


def test_the_page_is_self_contained_and_shows_totals_reasons_and_answers(tmp_path, ran):
    states = _states(ran)
    page = _page(ran, tmp_path)
    # Nothing to fetch: no http(s) or protocol-relative sources, links or stylesheets.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    # The totals, per state.
    for state in ("done", "failed", "rejected"):
        assert f"<b>{len(states[state]):,}</b><span>{state}</span>" in page
    assert "credits recorded" in page and "credits saved by reuse" in page
    # The runs' chart is inline SVG.
    assert '<svg class="chart"' in page and "run #1" in page
    # Every failed and rejected image is there, grouped by reason, with its key and reason.
    for r in states["failed"] + states["rejected"]:
        assert html.escape(r["key"]) in page
        assert html.escape(r["reason"]) in page
    assert 'id="rejected-' in page and 'id="failed-' in page
    # Every thumbnail is a small inline JPEG that decodes.
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) >= len(states["done"])
    for b64 in thumbs:
        raw = base64.b64decode(b64)
        assert len(raw) < 12_000
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    # A rejected file that cannot be decoded gets a placeholder saying so.
    assert "cannot be shown: empty" in page
    # Done images: the boxes in the answer's pixels over the thumbnail, the best match as a
    # caption, and the full record one click away.
    done = next(r for r in states["done"] if r["result"]["_objects"])
    w, h = done["result"]["_width"], done["result"]["_height"]
    x1, y1, x2, y2 = done["result"]["_objects"][0]["bound_box"]
    assert f'viewBox="0 0 {w} {h}"' in page
    assert f'<rect x="{x1}" y="{y1}" width="{x2 - x1}" height="{y2 - y1}"' in page
    best = done["result"]["_objects"][0]["_identification"]["best_match"]["name"]
    assert html.escape(best) in page
    assert html.escape(json.dumps(done["result"]["_status"]["request_id"])) in page
    assert page.count('<details class="card">') == len(states["done"]) + len(
        states["failed"]) + len(states["rejected"])


def test_an_image_gone_since_shows_a_placeholder_that_says_so(tmp_path, ran):
    gone = next(r for r in _states(ran)["done"] if r["key"].endswith("extra0.jpg"))
    Path(gone["key"]).unlink()
    page = _page(ran, tmp_path)
    assert "cannot be read any more: not_found:" in page


def test_sample_state_and_the_per_reason_cap(tmp_path, ran):
    states = _states(ran)
    page = _page(ran, tmp_path, "--sample", "2")
    assert f"Done: {len(states['done']):,} image(s), a sample of 2 shown" in page
    only = _page(ran, tmp_path, "--state", "failed")
    assert "<h2>Failed" in only and "<h2>Done" not in only and "<h2>Rejected" not in only
    # The library: one thumbnail per reason group, the other images listed by key.
    job = load_job(ran, require_token=False)
    stats = runner.write_report(job, tmp_path / "capped.html", per_reason=0, sample=0)
    capped = (tmp_path / "capped.html").read_text(encoding="utf-8")
    assert stats.thumbnails == 0
    assert stats.listed_without_thumbnail == len(states["failed"]) + len(states["rejected"])
    for r in states["rejected"]:
        assert f"<li><code>{html.escape(r['key'])}</code>" in capped


def test_no_database_yet_is_a_message_and_exit_1(tmp_path):
    job = write_job(tmp_path, "sandbox", tmp_path)
    res = invoke("report", str(job), "-o", str(tmp_path / "r.html"))
    assert res.exit_code == 1
    assert "no state database yet" in res.output
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(runner.StateError):
        runner.write_report(load_job(job, require_token=False), tmp_path / "r.html")


def test_many_failures_stay_grouped_by_kind_not_by_file(tmp_path, sandbox):
    make_images(tmp_path / "imgs", 30)
    job = write_job(tmp_path, sandbox, tmp_path / "imgs")
    run_json(job)
    for p in sorted((tmp_path / "imgs").iterdir())[:25]:
        p.write_bytes(b"")  # changed: rejected as empty on the next run
    run_json(job)
    page = _page(job, tmp_path)
    assert page.count('<div class="group') == 1  # one reason, 25 images
    assert "25 image(s)" in page


# --- in a real browser -------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get when it can): "
                    "the report was not checked in a browser")
    return path


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_every_thumbnail_loaded(tmp_path, ran):
    browser = _chromium()
    out = tmp_path / "report.html"
    res = invoke("report", str(ran), "-o", str(out))
    assert res.exit_code == 0, res.output
    n_imgs = out.read_text(encoding="utf-8").count("<img ")
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's script ran and found every thumbnail decoded.
    assert f'data-thumbs-loaded="ok {n_imgs}"' in dom.stdout, dom.stdout[:500]
    # The page logs nothing: any console line (an error, an uncaught exception) is a failure.
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1200,900", out.as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    with Image.open(shot) as im:
        assert im.size == (1200, 900)
        # Not a blank page: the screenshot has many colours (thumbnails, chart, tiles).
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50
