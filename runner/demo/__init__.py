"""`ximrun demo`: the demo job and its sample images, shipped inside the package.

`sample_data/` here is a byte-identical copy of the repository's `sample_data/` (a test keeps the
two so; `make sample-data` writes both), and `demo.toml` is `jobs/demo.toml` with its paths
relative to the folder it is written to. Nothing here needs the source checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

JOB_FILE = "demo.toml"
SAMPLES = "sample_data"
MARKER = b"# ximrun demo"  # the first line of demo.toml: how an earlier demo's folder is known


def shipped() -> dict[str, bytes]:
    """The demo's files, by their path relative to the demo folder."""
    here = files(__name__)
    out = {JOB_FILE: here.joinpath(JOB_FILE).read_bytes()}
    for entry in sorted(here.joinpath(SAMPLES).iterdir(), key=lambda e: e.name):
        if entry.is_file():
            out[f"{SAMPLES}/{entry.name}"] = entry.read_bytes()
    return out


def is_demo(folder: Path) -> bool:
    job = folder / JOB_FILE
    return job.is_file() and job.read_bytes().startswith(MARKER)


def write_demo(folder: Path) -> tuple[Path, int]:
    """Write the demo into `folder`, creating it; returns the job file and how many files were
    written. Files already as shipped are left alone, so a second run finds them unchanged.

    Raises FileExistsError for a file, or a folder that is neither empty nor an earlier demo.
    """
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_demo(folder):
        raise FileExistsError(f"{folder} is not empty and holds no earlier demo ({JOB_FILE}); "
                              "name a new or empty folder")
    written = 0
    for rel, data in shipped().items():
        target = folder / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written += 1
    return folder / JOB_FILE, written
