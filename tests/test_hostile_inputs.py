"""Hostile inputs: names that are not UTF-8, lone surrogates, huge files, devices and FIFOs,
symlinks out of the root, oversized manifest cells, manifest columns named like record fields."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from driver import (
    bars_jpeg,
    export_rows,
    invoke,
    make_images,
    plan_json,
    run_json,
    write_job,
    ximrun,
)

from runner.errors import ReadError
from runner.job import SourceConfig
from runner.records import Item, text_safe
from runner.storage import read_bytes

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names and FIFOs")


def rows_by_state(job: Path) -> dict[str, list[tuple[str, str | None]]]:
    out: dict[str, list[tuple[str, str | None]]] = {}
    for key, row in export_rows(job).items():
        out.setdefault(row["state"], []).append((key, row["reason"]))
    return out


# --- B1: names that are not UTF-8, ids with a lone surrogate -----------------------------------


def test_text_safe_escapes_only_what_sqlite_cannot_hold():
    assert text_safe("cards/é ok.jpg") == "cards/é ok.jpg"
    assert text_safe(os.fsdecode(b"/x/bad\xff.jpg")) == "/x/bad\\xff.jpg"
    assert text_safe("id-\ud800") == "id-\\ud800"


@posix_only
def test_a_file_name_that_is_not_utf8_is_stored_escaped_and_the_others_go_on(tmp_path: Path):
    folder = tmp_path / "imgs"
    make_images(folder, 3)
    odd = os.path.join(os.fsencode(folder), b"bad\xff.jpg")
    try:
        with open(odd, "wb") as fh:
            fh.write(bars_jpeg(77))
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    job = write_job(tmp_path, "sandbox", folder)
    assert plan_json(job)["listed"] == 4
    summary = run_json(job)
    assert summary["done"] == 4 and summary["failed"] == 0
    keys = set(export_rows(job))
    assert f"{folder}/bad\\xff.jpg" in keys
    assert run_json(job)["sent"] == 0  # the escaped key is stable: nothing sent twice


def test_a_jsonl_id_with_a_lone_surrogate_is_stored_escaped(tmp_path: Path):
    folder = tmp_path / "imgs"
    paths = make_images(folder, 3)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"path": str(paths[0]), "id": "odd-\ud800"}),  # written as "\ud800"
        json.dumps({"path": str(paths[1]), "id": "fine", "note": "x\udcff"}),
        json.dumps({"path": str(paths[2])}),
    ]) + "\n", encoding="ascii")
    job = write_job(tmp_path, "sandbox", manifest=str(manifest))
    assert plan_json(job)["listed"] == 3
    summary = run_json(job)
    assert summary["done"] == 3
    assert {"odd-\\ud800", "fine", str(paths[2])} == set(export_rows(job))


# --- B2: a byte limit before reading; regular files only ---------------------------------------


def test_a_file_over_max_bytes_is_failed_too_large_file_without_being_read(tmp_path: Path):
    folder = tmp_path / "imgs"
    make_images(folder, 2)
    huge = folder / "huge.jpg"
    with open(huge, "wb") as fh:  # sparse: 3 GB of nothing, on disk almost no space
        fh.write(bars_jpeg(5))
        fh.truncate(3 * 10**9)
    job = write_job(tmp_path, "sandbox", folder)
    summary = run_json(job, exit_code=1)
    assert summary["done"] == 2 and summary["failed"] == 1
    (key, reason), = rows_by_state(job)["failed"]
    assert key == str(huge)
    assert reason == f"too_large_file: {huge} is 3000000000 bytes, over images.max_bytes " \
                     "(100000000)"

    small = write_job(tmp_path, "sandbox", folder, name="small", images={"max_bytes": 700})
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    expected_failed = {n for n, size in sizes.items() if size > 700}
    summary = run_json(small, exit_code=1 if expected_failed else 0)
    failed = {Path(k).name for k, _ in rows_by_state(small).get("failed", [])}
    assert failed == expected_failed


def test_max_bytes_is_validated(tmp_path: Path):
    job = write_job(tmp_path, "sandbox", tmp_path, images={"max_bytes": -1})
    res = invoke("plan", str(job))
    assert res.exit_code == 2 and "images.max_bytes" in res.output


@posix_only
def test_devices_and_fifos_are_refused_never_read(tmp_path: Path):
    folder = tmp_path / "imgs"
    make_images(folder, 2)
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{folder / 'img0000.jpg'}\n{fifo}\n/dev/zero\n", encoding="utf-8")

    # the folder: the FIFO is not listed
    summary = run_json(write_job(tmp_path, "sandbox", folder, name="folder"))
    assert summary["listed"] == 2 and summary["done"] == 2
    # the manifest: both rows failed unread, with their reason (a row names an image, so it
    # gets a row); the good row done
    job = write_job(tmp_path, "sandbox", manifest=str(manifest), name="man")
    summary = run_json(job, exit_code=1)
    assert summary["done"] == 1 and summary["failed"] == 2
    reasons = {r["reason"] for r in export_rows(job, "--state", "failed").values()}
    assert reasons == {f"not_a_file: {fifo} (a device, FIFO or socket)",
                       "not_a_file: /dev/zero (a device, FIFO or socket)"}
    # a single-file root that is a device: refused up front, naming it
    res = invoke("run", str(write_job(tmp_path, "sandbox", "/dev/zero", name="dev")))
    assert res.exit_code == 2 and "/dev/zero: not a regular file" in res.output
    # a FIFO put where a listed file was: refused by the read, which does not block
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(_read(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    assert got and isinstance(got[0], ReadError) and "not a regular file" in str(got[0])


def _read(path: Path) -> object:
    try:
        return read_bytes(Item(str(path), str(path), 0, "0:0"), SourceConfig(), limit=1000)
    except ReadError as exc:
        return exc


# --- B3: symlinks ----------------------------------------------------------------------------------


@posix_only
def test_symlinks_are_not_followed_unless_asked_and_never_loop(tmp_path: Path):
    folder = tmp_path / "imgs"
    make_images(folder, 2)
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(bars_jpeg(99))
    (folder / "leak.jpg").symlink_to(secret)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "out").symlink_to(secret.parent, target_is_directory=True)

    job = write_job(tmp_path, "sandbox", folder)
    summary = run_json(job)
    assert summary["listed"] == 2
    assert all("secret" not in k and "leak" not in k for k in export_rows(job))

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{folder / 'leak.jpg'}\n{folder / 'img0001.jpg'}\n",
                        encoding="utf-8")
    man = write_job(tmp_path, "sandbox", manifest=str(manifest), name="man")
    summary = run_json(man, exit_code=1)  # the symlink row is failed, unread
    assert summary["done"] == 1 and summary["failed"] == 1
    [row] = export_rows(man, "--state", "failed").values()
    assert row["reason"].startswith("not_a_file: ") and "is a symlink" in row["reason"]

    asked = write_job(tmp_path, "sandbox", folder, name="asked")
    text = asked.read_text(encoding="utf-8")
    asked.write_text(text.replace("[source]\n", "[source]\nfollow_symlinks = true\n"),
                     encoding="utf-8")
    summary = run_json(asked)
    keys = set(export_rows(asked))
    # the link to a file and the linked folder are followed; the loop is walked once
    assert f"{folder}/leak.jpg" in keys and f"{folder}/out/secret.jpg" in keys
    assert summary["listed"] == 4, keys


# --- B4: manifest cells over the csv limit, reserved column names ------------------------------


def test_a_cell_over_the_csv_field_limit_skips_its_row_only(tmp_path: Path):
    paths = make_images(tmp_path / "imgs", 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,note\n"
                        f"{paths[0]},a\n"
                        f"{paths[1]},{'x' * 300_000}\n"
                        f"{paths[2]},c\n", encoding="utf-8")
    job = write_job(tmp_path, "sandbox", manifest=str(manifest))
    res = invoke("run", str(job), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["done"] == 2 and summary["skipped_rows"] == 1
    assert f"{manifest}:3: cannot be parsed: field larger than field limit" in res.stderr


@pytest.mark.parametrize("column", ["_url", "_base64", "_id", "_status", " _Custom"])
def test_a_manifest_column_named_like_a_record_field_is_refused_up_front(tmp_path: Path,
                                                                          column: str):
    paths = make_images(tmp_path / "imgs", 1)
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text(f"path,{column}\n{paths[0]},x\n", encoding="utf-8")
    jsonl_manifest = tmp_path / "m.jsonl"
    jsonl_manifest.write_text(json.dumps({"path": str(paths[0])}) + "\n"
                              + json.dumps({"path": str(paths[0]), column: "x"}) + "\n",
                              encoding="utf-8")
    for manifest in (csv_manifest, jsonl_manifest):
        job = write_job(tmp_path, "sandbox", manifest=str(manifest))
        for command in ("run", "plan"):
            res = invoke(command, str(job))
            assert res.exit_code == 2, res.output
            assert column.strip() in res.output and "reserved" in res.output


@posix_only
def test_check_reads_like_a_run_devices_fifos_and_huge_files_are_refused(tmp_path: Path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(3 * 10**9)
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(
        invoke("check", "/dev/zero", str(fifo), str(huge))), daemon=True)
    t.start()
    t.join(20)
    assert done, "ximrun check hangs on a device or a FIFO"
    res = done[0]
    assert res.exit_code == 1, res.output  # type: ignore[attr-defined]
    lines = res.output.splitlines()  # type: ignore[attr-defined]
    assert "/dev/zero is not a regular file" in lines[0]
    assert "pipe.jpg is not a regular file" in lines[1]
    assert "too_large_file" in lines[2]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_manifest_line_of_gigantic_length_is_skipped_without_being_held(tmp_path: Path,
                                                                          monkeypatch, kind):
    from runner import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_LINE_BYTES", 1000)
    paths = make_images(tmp_path / "imgs", 3)
    m = tmp_path / f"m.{kind}"
    if kind == "csv":
        text = f"path,note\n{paths[0]},a\n{paths[1]},{'x' * 5000}\n{paths[2]},c\n"
    else:
        text = "\n".join([json.dumps({"path": str(paths[0])}),
                          json.dumps({"path": str(paths[1]), "note": "x" * 5000}),
                          json.dumps({"path": str(paths[2])})]) + "\n"
    m.write_text(text, encoding="utf-8")
    res = invoke("run", str(write_job(tmp_path, "sandbox", manifest=str(m))), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["done"] == 2 and summary["skipped_rows"] == 1
    line = 3 if kind == "csv" else 2
    assert f"{m}:{line}: a line over 1000 bytes" in res.stderr


def test_an_endless_http_source_that_ignores_range_is_read_no_further_than_max_bytes(
        tmp_path: Path):
    import http.server

    small = bars_jpeg(3)

    class Endless(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when the server closes

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            self.do_HEAD()
            try:
                if self.path.startswith("/small"):
                    self.wfile.write(small)
                    return
                block = small + b"\0" * 65536
                while True:  # without end, about 6 MB/s, whatever Range asked for
                    self.wfile.write(block)
                    time.sleep(0.01)
            except OSError:
                pass  # the client had enough

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"url,id\n{base}/endless.jpg,endless\n{base}/small.jpg,small\n",
                            encoding="utf-8")
        job = write_job(tmp_path, "sandbox", manifest=str(manifest),
                        images={"max_bytes": 100_000})
        child = ximrun(tmp_path, "run", str(job), timeout=30)  # fails if it hangs
        assert child.proc.returncode == 1, child.output()
    finally:
        server.shutdown()
        server.server_close()
    rows = export_rows(job)
    assert rows["small"]["state"] == "done"
    assert rows["endless"]["state"] == "failed"
    assert rows["endless"]["reason"].startswith("too_large_file: ")
