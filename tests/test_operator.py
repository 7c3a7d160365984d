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
