"""A few hundred generated hostile files and manifest rows through `ximrun run` in a subprocess:
no traceback, no hang past a bound, every good image done, every other one accounted for."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sqlite3
import sys
import zlib
from pathlib import Path

import pytest
from driver import bars_jpeg, ximrun
from PIL import Image

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX names, FIFOs, symlinks")

BOUND_S = 120  # the whole run, a few hundred files on two shared cores
MAX_BYTES = 40_000


def png_bomb(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels: the pixel guard must refuse it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def noise_png(rnd: random.Random, side: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), rnd.randbytes(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


class Corpus:
    """Files written into a folder; what each one should become."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rnd = random.Random(seed)
        self.good: set[str] = set()  # keys that must end done
        self.n = 0

    def name(self, suffix: str = ".jpg") -> str:
        self.n += 1
        return f"f{self.n:04d}{suffix}"

    def image(self) -> bytes:
        return bars_jpeg(1000 + self.n)

    def put(self, rel: str | bytes, data: bytes, good: bool) -> Path:
        path = os.path.join(os.fsencode(self.root), os.fsencode(rel)) if isinstance(rel, str) \
            else os.path.join(os.fsencode(self.root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        if good:  # the key: the name as the system spells it, escaped where not UTF-8
            self.good.add(_escaped(os.fsdecode(path)))
        return Path(os.fsdecode(path))


def build(root: Path, outside: Path, seed: int) -> Corpus:
    c = Corpus(root, seed)
    rnd = c.rnd
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(bars_jpeg(4242))
    odd_names = ["space name.jpg", "hash#1.jpg", "q?x=1.jpg", "pct%41.jpg", "new\nline.jpg",
                 "tab\t.jpg", "ünï cødé.jpg", "日本語.jpg", "emoji🙂.jpg", "back\\slash.jpg",
                 "quote\"'.jpg", "semi;colon.jpg", "=HYPERLINK(1).jpg", "-dash.jpg",
                 "x" * 200 + ".jpg", "UPPER.JPG", "no_suffix", "trailing.jpg ", " lead.jpg"]
    for i, name in enumerate(odd_names):
        c.put(f"odd/{i:02d}/{name}", c.image(), good=True)
        c.n += 1
    for raw in (b"bad\xff.jpg", b"latin\xe9.jpg", b"half\xe6\x97.jpg", b"\xc0\xaf.jpg"):
        c.put(b"bytes/" + raw, c.image(), good=True)
        c.n += 1
    for depth in range(1, 12):
        c.put("/".join(f"d{k}" for k in range(depth)) + "/" + c.name(), c.image(), good=True)
    for _ in range(150):  # good images, a few of them identical (reused, not paid twice)
        data = c.image() if rnd.random() > 0.1 else bars_jpeg(7)
        c.put("good/" + c.name(), data, good=True)
    for _ in range(120):  # broken or hostile content: rejected or failed, never done
        kind = rnd.choice(["empty", "noise", "truncated", "text", "html", "bomb", "big",
                           "zeros", "gzip", "header"])
        if kind == "empty":
            data = b""
        elif kind == "noise":
            data = rnd.randbytes(rnd.randint(1, 5000))
        elif kind == "truncated":
            full = c.image()
            data = full[: rnd.randint(1, len(full) - 10)]
        elif kind == "text":
            data = b"hello, I am not an image\n" * rnd.randint(1, 50)
        elif kind == "html":
            data = b"<html><script>alert(1)</script></html>"
        elif kind == "bomb":
            data = png_bomb(rnd.choice([30_000, 65_000, 100_000]))
        elif kind == "big":
            data = noise_png(rnd, 160)  # > MAX_BYTES: too_large_file, never read
            assert len(data) > MAX_BYTES
        elif kind == "zeros":
            data = b"\0" * rnd.randint(1, 30_000)
        elif kind == "gzip":
            data = zlib.compress(b"\0" * 10**6)
        else:
            data = b"\xff\xd8\xff\xe0" + rnd.randbytes(rnd.randint(0, 200))
        c.put("bad/" + c.name(rnd.choice([".jpg", ".png", ".gif", ".webp", ""])), data, good=False)
    big = root / "bad" / "sparse.jpg"
    with open(big, "wb") as fh:
        fh.write(bars_jpeg(5))
        fh.truncate(5 * 10**9)
    (root / ".hidden.jpg").write_bytes(c.image())  # hidden: not listed
    (root / "folder.jpg").mkdir()
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "bad" / "pipe2.jpg")
    (root / "link-out.jpg").symlink_to(outside / "secret.jpg")
    (root / "link-dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "link-loop").symlink_to(root, target_is_directory=True)
    (root / "link-outdir").symlink_to(outside, target_is_directory=True)
    return c


def manifest_rows(c: Corpus, folder: Path, outside: Path) -> tuple[list[str], set[str]]:
    """JSONL lines (valid or not) and the ids that must end done."""
    rnd = c.rnd
    good_files = sorted(p for p in (folder / "good").iterdir())
    lines: list[str] = []
    good: set[str] = set()
    for i, p in enumerate(good_files[:60]):
        ident = rnd.choice([f"id-{i}", f"odd-\ud800-{i}", f"é{i}", f"{i}\udcff", f"=cmd|{i}",
                            f"spaces {i}", f"{i}" * 3])
        row: dict[str, object] = {"path": str(p), "id": ident}
        if rnd.random() < 0.5:
            row["note"] = rnd.choice(["x" * 5000, {"nested": [1, 2, {"a": None}]}, 3.5, None,
                                      "\ud800", "line\nbreak", True])
        lines.append(json.dumps(row))
        good.add(_escaped(ident))
    for bad in ("{not json", "[1, 2]", "42", '"a string"', "null", "{}", '{"path": null}',
                '{"path": ""}', '{"path": 5}', '{"path": ["a"]}',
                json.dumps({"path": str(folder / "missing.jpg"), "id": "missing"}),
                json.dumps({"path": str(folder / "pipe.jpg"), "id": "fifo"}),
                json.dumps({"path": "/dev/zero", "id": "zero"}),
                json.dumps({"path": str(folder / "link-out.jpg"), "id": "link"}),
                json.dumps({"path": str(folder / "folder.jpg"), "id": "dir"}),
                "\ufeff" + json.dumps({"path": "x"}), "\x00\x01\x02"):
        lines.insert(rnd.randrange(len(lines) + 1), bad)
    return lines, good


def _escaped(text: str) -> str:
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def csv_manifest(c: Corpus, folder: Path, path: Path) -> set[str]:
    good_files = sorted((folder / "good").iterdir())[60:100]
    good: set[str] = set()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "id", "note"])
    for i, p in enumerate(good_files):
        w.writerow([str(p), f"c{i}", "=1+1" if i % 5 == 0 else "fine"])
        good.add(f"c{i}")
        if i % 7 == 0:
            buf.write(f'{p},big{i},"{"y" * 200_000}"\n')  # over the csv field limit
        if i % 9 == 0:
            buf.write(f"{p},extra{i},a,b,c,d\n")  # too many values
    buf.write('"unterminated,quote\n')
    path.write_text(buf.getvalue(), encoding="utf-8")
    return good


@pytest.mark.slow
def test_a_few_hundred_hostile_files_and_rows_never_crash_hang_or_lose_a_good_image(
        tmp_path: Path):
    folder = tmp_path / "data"
    corpus = build(folder, tmp_path / "outside", seed=20261201)
    jsonl = tmp_path / "m.jsonl"
    lines, good_ids = manifest_rows(corpus, folder, tmp_path / "outside")
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    good_csv = csv_manifest(corpus, folder, tmp_path / "m.csv")

    def job(name: str, source: str) -> Path:
        p = tmp_path / f"{name}.toml"
        p.write_text(f'name = "{name}"\n{source}\n[api]\nendpoint = "sandbox"\nmax_retries = 1\n'
                     f'[images]\nmax_bytes = {MAX_BYTES}\n[state]\ndb = "state/{name}.db"\n',
                     encoding="utf-8")
        return p

    jobs = {
        "folder": (job("folder", f'[source]\npaths = ["{folder}"]'), corpus.good),
        "jsonl": (job("jsonl", f'[source]\nmanifest = "{jsonl}"'), good_ids),
        "csv": (job("csv", f'[source]\nmanifest = "{tmp_path / "m.csv"}"'), good_csv),
    }
    for name, (path, good) in jobs.items():
        for command in ("plan", "run", "status", "export"):
            child = ximrun(tmp_path, command, str(path), tag=f"{name}-{command}",
                           timeout=BOUND_S)
            out = child.output()
            assert "Traceback" not in out and "Logging error" not in out, out[-4000:]
            assert child.proc.returncode in (0, 1), out[-4000:]
        with sqlite3.connect(tmp_path / "state" / f"{name}.db") as db:
            rows = dict(db.execute("SELECT key, state FROM items WHERE job = ?", (name,)))
            reasons = dict(db.execute("SELECT key, reason FROM items WHERE job = ?", (name,)))
        not_done = {k: (rows.get(k), reasons.get(k)) for k in good if rows.get(k) != "done"}
        assert not not_done, not_done
        assert "pending" not in rows.values()
        # nothing outside the root was read, no FIFO or device: not listed from a folder; as a
        # manifest row, failed unread (not_a_file: a symlink, a device, a FIFO)
        odd = {k for k in rows if "secret" in k or "pipe" in k or k.endswith("zero")}
        assert all(rows[k] == "failed" and reasons[k].startswith("not_a_file: ") for k in odd), \
            {k: (rows[k], reasons[k]) for k in odd}
        assert all(k.encode("utf-8") for k in rows)  # valid UTF-8 throughout
    bad_rows = dict(sqlite3.connect(tmp_path / "state" / "folder.db").execute(
        "SELECT key, reason FROM items WHERE state IN ('failed', 'rejected')"))
    assert bad_rows[f"{folder}/bad/sparse.jpg"].startswith("too_large_file: ")
