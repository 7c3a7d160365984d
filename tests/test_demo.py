"""`ximrun demo`: the demo job and sample images that ship inside the package."""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path

from driver import invoke

from runner.demo import shipped
from runner.job import load_job

REPO = Path(__file__).resolve().parent.parent


def test_demo_writes_the_job_and_runs_it_then_a_second_time_sends_nothing(tmp_path):
    folder = tmp_path / "my demo"
    res = invoke("demo", str(folder))
    assert res.exit_code == 0, res.output
    assert "ximrun: demo: finished in" in res.output and "(exit 0)" in res.output
    assert "listed 23: new 23" in res.output
    assert "sent 10 in 1 request(s): done 12 (reused 2), failed 0, rejected 11" in res.output
    assert "credits 100 recorded, 20 saved by reuse" in res.output
    assert f"ximrun status '{folder / 'demo.toml'}'" in res.output
    assert (folder / "demo.toml").is_file() and (folder / "state" / "demo.db").is_file()
    assert len(list((folder / "sample_data").iterdir())) == 24  # 23 images and the README

    again = invoke("demo", str(folder))
    assert again.exit_code == 0, again.output
    assert "holds the demo already" in again.output
    assert "listed 23: new 0, changed 0, unchanged 23" in again.output
    assert "sent 0 in 0 request(s)" in again.output
    status = invoke("status", str(folder / "demo.toml"), "--json")
    assert '"done": 12' in status.output


def test_demo_restores_a_deleted_sample_and_defaults_to_ximrun_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("demo").exit_code == 0
    (tmp_path / "ximrun-demo" / "sample_data" / "card_png.png").unlink()
    res = invoke("demo")
    assert res.exit_code == 0, res.output
    assert "(1 file(s)) to ximrun-demo" in res.output
    # A new file with the known bytes: changed (its date), answered by reuse, nothing sent.
    assert "changed 1, unchanged 22" in res.output
    assert "sent 0 in 0 request(s): done 1 (reused 1)" in res.output


def test_demo_refuses_a_folder_that_is_not_empty_and_no_earlier_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    res = invoke("demo", str(tmp_path))
    assert res.exit_code == 2
    assert "not empty" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "notes.txt"
    assert invoke("demo", str(a_file)).exit_code == 2


def test_the_shipped_samples_are_byte_identical_to_sample_data():
    """Two copies, one truth: `make sample-data` writes both; this keeps them from drifting."""
    ours = {f"sample_data/{p.name}": p.read_bytes()
            for p in sorted((REPO / "sample_data").iterdir()) if p.is_file()}
    theirs = {k: v for k, v in shipped().items() if k.startswith("sample_data/")}
    assert sorted(theirs) == sorted(ours)
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_the_shipped_job_is_jobs_demo_toml_but_for_its_paths(tmp_path):
    (tmp_path / "demo.toml").write_bytes(shipped()["demo.toml"])
    packaged = load_job(tmp_path / "demo.toml")
    repo = load_job(REPO / "jobs" / "demo.toml")
    assert packaged.uses_sandbox
    assert packaged.source.paths == (str(tmp_path / "sample_data") + "/",)
    assert packaged.db_path == tmp_path / "state" / "demo.db"
    same = ("name", "api", "images", "credits", "executor", "sandbox")
    for name in same:
        assert getattr(packaged, name) == getattr(repo, name), name
    assert dataclasses.replace(packaged.source, paths=()) == dataclasses.replace(repo.source,
                                                                                 paths=())


def test_the_demo_is_package_data():
    here = files("runner.demo")
    assert here.joinpath("demo.toml").is_file()
    assert here.joinpath("sample_data", "card_heic.heic").is_file()
