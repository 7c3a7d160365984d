"""What an operator sees: `check` on a folder, `ximrun sandbox` by hand, the progress bar and the
log lines off a terminal."""

from __future__ import annotations

import json
from pathlib import Path

from driver import invoke, jpeg, png, write_job

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
