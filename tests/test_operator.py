"""What an operator sees: `check` on a folder, `ximrun sandbox` by hand, the progress bar and the
log lines off a terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

from driver import invoke, jpeg, png, write_job

from runner.summary import Summary

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def test_check_a_folder_checks_the_files_inside_recursively(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(jpeg((1, 2, 3)))
    (d / "sub" / "b.png").write_bytes(png((4, 5, 6)))
    (d / "sub" / "c.avif").write_bytes((SAMPLE / "reject_avif.avif").read_bytes())
    (d / ".hidden.jpg").write_bytes(b"not an image")
    res = invoke("check", str(d), "--json")
    assert res.exit_code == 1, res.output
    verdicts = {Path(v["file"]).name: v for v in map(json.loads, res.stdout.splitlines())}
    assert set(verdicts) == {"a.jpg", "b.png", "c.avif"}
    assert verdicts["c.avif"]["reason"] == "unsupported_format:avif"
    assert "IsADirectoryError" not in res.output

    # With --job: the job's include/exclude (and its [images] policy).
    job = write_job(tmp_path, "sandbox", d, exclude=["*.avif"], images={"transcode": ["avif"]})
    res = invoke("check", str(d), "--job", str(job))
    assert res.exit_code == 0, res.output
    assert "a.jpg" in res.stdout and "b.png" in res.stdout and "c.avif" not in res.stdout


def test_the_sandbox_by_hand_says_where_to_point_a_job_and_its_totals_when_stopped(tmp_path):
    import re
    import signal
    import urllib.request

    from driver import make_images, start, wait_for

    child = start(tmp_path, "sandbox", "--port", "0", "--token", "s3cret", "--pdrop", "0.5",
                  "--seed", "4", tag="sandbox")
    try:
        wait_for(lambda: "settings" in child.stdout, "the sandbox's banner", child)
        out = child.stdout
        endpoint = re.search(r"endpoint  (http://\S+/collectibles/v2/tcg_id)", out).group(1)
        assert "'s3cret' only (export XIMILAR_TOKEN=s3cret)" in out
        ledger_url = re.search(r"ledger    (http://\S+)", out).group(1)
        assert re.search(r"account   http://\S+/account/v2/details", out)
        assert "pdrop = 0.5, seed = 4" in out
        make_images(tmp_path / "imgs", 30)
        job = write_job(tmp_path, endpoint, tmp_path / "imgs", api={"batch_size": 3,
                                                                   "max_retries": 8})
        res = invoke("run", str(job), "--json", env={"XIMILAR_TOKEN": "s3cret"})
        assert res.exit_code == 0, res.output
        with urllib.request.urlopen(ledger_url, timeout=10) as resp:
            ledger = json.load(resp)
        rows = invoke("export", str(job), env={"XIMILAR_TOKEN": "s3cret"}).stdout.splitlines()
        sends = {r["key"]: r["sends"] for r in map(json.loads, rows)}
        seen: dict[str, int] = {}
        for e in ledger["entries"]:
            seen[e["record_id"]] = seen.get(e["record_id"], 0) + 1
        assert seen == sends
    finally:
        child.proc.send_signal(signal.SIGINT)
        assert child.wait() == 0, child.output()
    billed = sum(e["billed"] for e in ledger["entries"])
    lost = sum(e["billed"] and not e["answered"] for e in ledger["entries"])
    assert lost, "no answer was lost: raise pdrop"
    assert (f"{len(ledger['entries'])} record(s) (30 distinct id(s)): {billed} billed "
            f"({lost} whose answer was lost)") in child.stdout
    assert f"credits used {ledger['credits_used']}" in child.stdout


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_has_no_total_until_the_listing_ends(monkeypatch):
    from runner.cli import progress as cli

    monkeypatch.setattr(cli.sys, "stderr", _Tty())
    progress = cli.Progress(enabled=True)
    s = Summary(job="j")
    for listed in (100, 200, 400):  # the listing streams: a total would grow, 90 % -> 80 %
        s.listed = s.new = listed
        s.done += 50
        progress(s)
        assert progress.bar.total is None and progress.bar.n == s.done
    s.listed = s.new = 500
    s.listing_done = True
    progress(s)
    assert progress.bar.total == 500
    percents = []
    for _ in range(3):
        s.done += 50
        progress(s)
        percents.append(progress.bar.n / progress.bar.total)
    assert percents == sorted(percents) and progress.bar.total == 500
    progress.close()


def test_off_a_terminal_the_run_logs_its_start_and_its_listing(tmp_path):
    for i in range(3):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg((i, 0, 0)))
    job = write_job(tmp_path, "http://user:pw@127.0.0.1:9/x/collectibles/v2/tcg_id?key=k",
                    tmp_path / "imgs", api={"max_retries": 0, "breaker_failures": 1})
    res = invoke("run", str(job))
    started = [line for line in res.stderr.splitlines() if "run started" in line]
    assert len(started) == 1, res.stderr
    assert "job t, db " in started[0] and "t.db" in started[0]
    assert "endpoint http://127.0.0.1:9/x/collectibles/v2/tcg_id, executor local" in started[0]
    assert "pw" not in res.stderr and "key=k" not in res.stderr
    assert "listing done: 3 listed (new 3, changed 0, unchanged 0, resumed 0, failed before 0):" \
           " 3 to do" in res.stderr
    quiet = invoke("run", str(job), "-q")
    assert "run started" not in quiet.stderr and "listing done" not in quiet.stderr
