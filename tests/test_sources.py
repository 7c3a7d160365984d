"""Listing roots and manifests into Items, reading and presigning: local files and a real S3 server."""

from __future__ import annotations

import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import requests
from s3server import REGION, set_auth

from runner import manifest as manifests
from runner import sources, storage
from runner.errors import ReadError, SourceError
from runner.job import SourceConfig
from runner.records import Item


def src(*paths: str | Path, **kw) -> SourceConfig:
    return SourceConfig(paths=tuple(str(p) for p in paths), **kw)


def keys(source: SourceConfig, **kw) -> list[str]:
    return sorted(i.key for i in sources.list_items(source, **kw))


def by_key(source: SourceConfig, **kw) -> dict[str, Item]:
    return {i.key: i for i in sources.list_items(source, **kw)}


def write(path: Path, data: bytes = b"img") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in ("a.jpg", "b.png", "notes.md", "cards/c.jpg", "cards/deep/d.jpg",
                "cards/_thumbs/t.jpg", ".hidden.jpg", ".git/e.jpg", "cards/.f.jpg"):
        write(root / rel)
    (root / "empty").mkdir()
    return root


# --- local roots -------------------------------------------------------------------------------


def test_local_folder_recursive_lists_every_visible_file_with_absolute_keys(tree: Path) -> None:
    items = by_key(src(tree))
    assert sorted(items) == [str(tree / r) for r in (
        "a.jpg", "b.png", "cards/_thumbs/t.jpg", "cards/c.jpg", "cards/deep/d.jpg", "notes.md")]
    a = items[str(tree / "a.jpg")]
    assert a.uri == a.key and a.size == 3 and a.extra == {}
    assert a.fingerprint == f"3:{(tree / 'a.jpg').stat().st_mtime_ns}"


def test_local_folder_trailing_slash_and_file_url_give_the_same_keys(tree: Path) -> None:
    assert keys(src(f"{tree}/")) == keys(src(tree)) == keys(src(f"file://{tree}"))


def test_local_folder_not_recursive_lists_only_direct_children(tree: Path) -> None:
    assert keys(src(tree, recursive=False)) == [str(tree / r) for r in ("a.jpg", "b.png", "notes.md")]


def test_single_file_root_is_listed_even_when_hidden(tree: Path) -> None:
    assert keys(src(tree / "cards" / "c.jpg")) == [str(tree / "cards" / "c.jpg")]
    assert keys(src(tree / ".hidden.jpg")) == [str(tree / ".hidden.jpg")]


def test_local_globs_keep_star_within_a_segment_and_double_star_across(tree: Path) -> None:
    assert keys(src(f"{tree}/*.jpg")) == [str(tree / "a.jpg")]
    assert keys(src(f"{tree}/*/c.jpg")) == [str(tree / "cards/c.jpg")]
    assert keys(src(f"{tree}/**/*.jpg")) == [str(tree / r) for r in (
        "a.jpg", "cards/_thumbs/t.jpg", "cards/c.jpg", "cards/deep/d.jpg")]
    assert keys(src(f"{tree}/nothing-*.jpg")) == []


def test_include_and_exclude_match_relative_path_or_base_name(tree: Path) -> None:
    got = keys(src(tree, include=("*.jpg",), exclude=("cards/deep/*", "_thumbs")))
    # "_thumbs" is a folder name, not a file's base name or path: it excludes nothing by itself.
    assert got == [str(tree / r) for r in ("a.jpg", "cards/_thumbs/t.jpg", "cards/c.jpg")]
    assert keys(src(tree, include=("cards/*",), exclude=("*/_thumbs/*", "d.jpg"))) == [
        str(tree / "cards/c.jpg")]
    # case-sensitive
    assert keys(src(tree, include=("*.JPG",))) == []
    # an empty include list keeps everything
    assert len(keys(src(tree, include=()))) == 6


def test_missing_local_root_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        list(sources.list_items(src(tmp_path / "nope")))


def test_empty_local_folder_yields_nothing(tree: Path) -> None:
    assert keys(src(tree / "empty")) == []


def test_local_fingerprint_changes_when_the_file_changes(tmp_path: Path) -> None:
    f = write(tmp_path / "x.jpg", b"one")
    first = by_key(src(f))[str(f)].fingerprint
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    touched = by_key(src(f))[str(f)].fingerprint
    f.write_bytes(b"longer")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    resized = by_key(src(f))[str(f)].fingerprint
    assert len({first, touched, resized}) == 3
    assert resized == "6:1000000000"


def test_read_bytes_local_whole_head_and_vanished(tmp_path: Path) -> None:
    f = write(tmp_path / "x.jpg", b"0123456789")
    item, = sources.list_items(src(f))
    assert storage.read_bytes(item, src(f)) == b"0123456789"
    assert storage.read_bytes(item, src(f), max_bytes=4) == b"0123"
    f.unlink()
    with pytest.raises(ReadError, match=r"^not_found: "):
        storage.read_bytes(item, src(f))
    assert storage.presign(item, src(f)) is None


def test_other_fsspec_protocols_list_through_fsspec() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/ximrun-{uuid.uuid4().hex}"
    fs.pipe({f"{base}/a.jpg": b"aa", f"{base}/sub/b.jpg": b"bbb", f"{base}/sub/.c.jpg": b"c"})
    try:
        items = by_key(src(f"memory://{base}/"))
        assert sorted(items) == [f"memory://{base}/a.jpg", f"memory://{base}/sub/b.jpg"]
        b = items[f"memory://{base}/sub/b.jpg"]
        assert b.size == 3 and b.fingerprint.startswith("3:")
        assert storage.read_bytes(b, src()) == b"bbb"
        assert keys(src(f"memory://{base}/", recursive=False)) == [f"memory://{base}/a.jpg"]
        with pytest.raises(SourceError):
            list(sources.list_items(src(f"memory://{base}/missing")))
    finally:
        fs.rm(base, recursive=True)


# --- S3 ----------------------------------------------------------------------------------------


def test_s3_nested_prefixes_recursive_and_not(s3_bucket) -> None:
    b = s3_bucket
    for key in ("2026/01/a.jpg", "2026/01/b.png", "2026/02/c.jpg", "2026/top.jpg", "other/x.jpg",
                "2026/.hidden.jpg"):
        b.put(key, b"data")
    b.put("2026/01/", b"")  # a "folder" made in the console
    opts = {"storage_options": b.storage_options}
    want = [b.url(k) for k in ("2026/01/a.jpg", "2026/01/b.png", "2026/02/c.jpg", "2026/top.jpg")]
    assert keys(src(b.url("2026/"), **opts)) == want
    assert keys(src(b.url("2026"), **opts)) == want
    assert keys(src(b.url("2026/"), recursive=False, **opts)) == [b.url("2026/top.jpg")]
    assert keys(src(b.url("2026/"), include=("01/*",), **opts)) == want[:2]
    assert len(keys(src(f"s3://{b.name}", **opts))) == 5
    item = by_key(src(b.url("2026/01/a.jpg"), **opts))[b.url("2026/01/a.jpg")]
    assert item.uri == item.key and item.size == 4


def test_s3_glob_lists_only_matches(s3_bucket) -> None:
    b = s3_bucket
    for key in ("2026/01/x1.png", "2026/01/y1.png", "2026/02/x2.png", "2026/02/deep/x3.png",
                "2026/x0.png"):
        b.put(key, b"p")
    opts = {"storage_options": b.storage_options}
    assert keys(src(b.url("2026/*/x*.png"), **opts)) == [b.url("2026/01/x1.png"), b.url("2026/02/x2.png")]
    assert keys(src(b.url("2026/x*.png"), **opts)) == [b.url("2026/x0.png")]
    assert len(keys(src(b.url("2026/**/x*.png"), **opts))) == 4


def test_s3_fingerprint_is_size_and_etag_and_changes_on_overwrite(s3_bucket) -> None:
    b = s3_bucket
    b.put("a.jpg", b"first")
    source = src(b.url(), storage_options=b.storage_options)
    before, = sources.list_items(source)
    etag = b.client.head_object(Bucket=b.name, Key="a.jpg")["ETag"].strip('"')
    assert before.fingerprint == f"5:{etag}"
    b.put("a.jpg", b"other")  # same size, new bytes
    after, = sources.list_items(source)
    assert after.fingerprint != before.fingerprint and after.size == 5


@pytest.mark.slow
def test_s3_listing_pages_past_1000_keys(s3_bucket) -> None:
    b = s3_bucket
    b.put_many({f"many/{i:05d}.jpg": b"x" for i in range(1205)})
    got = keys(src(b.url("many/"), storage_options=b.storage_options))
    assert len(got) == 1205 and len(set(got)) == 1205
    assert got[0] == b.url("many/00000.jpg") and got[-1] == b.url("many/01204.jpg")


def test_s3_keys_with_spaces_and_unicode_round_trip(s3_bucket) -> None:
    b = s3_bucket
    names = {"dir with space/my card.jpg": b"one", "ünïcødé/カード 1.png": b"two",
             "plus+and%25.jpg": b"three"}
    for k, v in names.items():
        b.put(k, v)
    source = src(b.url(), storage_options=b.storage_options)
    items = by_key(source)
    assert sorted(items) == sorted(b.url(k) for k in names)
    for k, v in names.items():
        assert storage.read_bytes(items[b.url(k)], source) == v
    assert by_key(src(b.url("ünïcødé/"), storage_options=b.storage_options)).keys() == {
        b.url("ünïcødé/カード 1.png")}


def test_s3_object_deleted_after_listing_is_a_not_found_read_error(s3_bucket) -> None:
    b = s3_bucket
    b.put("gone.jpg", b"soon gone")
    source = src(b.url(), storage_options=b.storage_options)
    item, = sources.list_items(source)
    assert storage.read_bytes(item, source, max_bytes=4) == b"soon"
    b.client.delete_object(Bucket=b.name, Key="gone.jpg")
    with pytest.raises(ReadError, match=r"^not_found: s3://.*gone\.jpg"):
        storage.read_bytes(item, source)


def test_read_many_fetches_objects_together_and_says_why_one_is_missing(s3_bucket,
                                                                         tmp_path) -> None:
    # Keys with glob characters are objects like any other, never patterns.
    b = s3_bucket
    names = {"a[1].jpg": b"one", "b*?.jpg": b"two", "c/d.jpg": b"three", "gone.jpg": b"four"}
    b.put_many(names)
    local = tmp_path / "local.jpg"
    local.write_bytes(b"five")
    source = src(b.url(), storage_options=b.storage_options)
    items = by_key(source)
    b.client.delete_object(Bucket=b.name, Key="gone.jpg")
    order = [items[b.url("c/d.jpg")], Item(str(local), str(local), 4, "x"),
             items[b.url("gone.jpg")], items[b.url("a[1].jpg")], items[b.url("b*?.jpg")],
             Item(str(tmp_path / "none.jpg"), str(tmp_path / "none.jpg"), 1, "x")]
    got = storage.read_many(order, source)
    assert got[:2] == [b"three", b"five"] and got[3:5] == [b"one", b"two"]
    assert isinstance(got[2], ReadError) and str(got[2]) == f"not_found: {b.url('gone.jpg')}"
    assert isinstance(got[5], ReadError) and str(got[5]).startswith("not_found: ")


def test_s3_access_denied_on_read_and_on_listing(s3_bucket) -> None:
    # moto does not evaluate bucket policies; it does enforce IAM user policies once auth is on.
    b = s3_bucket
    b.put("ok.jpg", b"fine")
    b.put("secret.jpg", b"hidden")
    iam = boto3.client("iam", endpoint_url=b.endpoint_url, region_name=REGION)
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject",
             "Resource": f"arn:aws:s3:::{b.name}/secret.jpg"},
            # s3:List*, not s3:ListBucket alone: moto 5.2.6 checks a listing against the
            # operation's name (s3:ListObjectsV2) where AWS and earlier moto check ListBucket.
            {"Effect": "Deny", "Action": "s3:List*", "Resource": "arn:aws:s3:::*-nolist"},
        ]}))
    cred = iam.create_access_key(UserName=user)["AccessKey"]
    opts = {"endpoint_url": b.endpoint_url, "key": cred["AccessKeyId"],
            "secret": cred["SecretAccessKey"]}
    nolist = f"{b.name[:40]}-nolist"
    b.client.create_bucket(Bucket=nolist)
    source = src(b.url(), storage_options=opts)
    set_auth(b.endpoint_url, True)
    try:
        items = by_key(source)
        assert sorted(items) == [b.url("ok.jpg"), b.url("secret.jpg")]
        assert storage.read_bytes(items[b.url("ok.jpg")], source) == b"fine"
        with pytest.raises(ReadError, match=r"^access_denied: s3://.*secret\.jpg"):
            storage.read_bytes(items[b.url("secret.jpg")], source)
        with pytest.raises(SourceError, match="access denied"):
            list(sources.list_items(src(f"s3://{nolist}/", storage_options=opts)))
    finally:
        set_auth(b.endpoint_url, False)


def test_s3_empty_bucket_and_empty_prefix_yield_nothing(s3_bucket) -> None:
    opts = {"storage_options": s3_bucket.storage_options}
    assert keys(src(s3_bucket.url(), **opts)) == []
    assert keys(src(s3_bucket.url("nothing/here/"), **opts)) == []


def test_s3_missing_bucket_or_object_raises_source_error(s3_bucket) -> None:
    opts = {"storage_options": s3_bucket.storage_options}
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-\w+/.*no such bucket"):
        list(sources.list_items(src(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x/", **opts)))
    with pytest.raises(SourceError, match="no such object or prefix"):
        list(sources.list_items(src(s3_bucket.url("missing.jpg"), **opts)))


def test_presign_gives_a_url_that_fetches_the_object(s3_bucket) -> None:
    b = s3_bucket
    b.put("cards/ace of spades.jpg", b"\xff\xd8jpeg")
    source = src(b.url(), storage_options=b.storage_options)
    item, = sources.list_items(source)
    url = storage.presign(item, source, expires_s=300)
    assert url is not None and url.startswith(b.endpoint_url)
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"\xff\xd8jpeg"
    http_item = Item(key="k", uri="https://example.com/a.jpg", size=None, fingerprint="url:x")
    assert storage.presign(http_item, source) == "https://example.com/a.jpg"


@pytest.mark.slow
def test_read_bytes_from_many_threads_at_once(s3_bucket) -> None:
    b = s3_bucket
    n = 24
    b.put_many({f"t/{i:03d}.jpg": f"body-{i}".encode() for i in range(n)})
    source = src(b.url("t/"), storage_options=b.storage_options)
    items = sorted(sources.list_items(source), key=lambda i: i.key)
    start = threading.Barrier(8)

    def read_all(offset: int) -> list[bytes]:
        start.wait()
        return [storage.read_bytes(items[(offset + i) % n], source) for i in range(n)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read_all, range(8)))
    for offset, got in enumerate(results):
        assert got == [f"body-{(offset + i) % n}".encode() for i in range(n)]


# --- manifests ---------------------------------------------------------------------------------


def test_csv_manifest_paths_urls_ids_extras_and_bad_rows(tmp_path: Path) -> None:
    write(tmp_path / "imgs" / "a.jpg", b"aaaa")
    write(tmp_path / "b.jpg", b"bb")
    absolute = write(tmp_path / "elsewhere" / "c.jpg", b"c")
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,path,url,brand,price\n"                            # line 1
        "sku-1,imgs/a.jpg,,acme,10\n"                          # 2
        ",b.jpg,,\"multi\nline\",5\n"                          # 3-4
        f"sku-3,{absolute},,zeta,1\n"                          # 5
        "sku-4,,https://cdn.example.com/x.jpg?v=2,web,2\n"     # 6
        "sku-5,,,nobody,3\n"                                   # 7: no path or url
        "sku-6,imgs/missing.jpg,,gone,4\n"                     # 8: no such file
        "sku-7,b.jpg,,too,many,values\n"                       # 9: too many fields
        "\n"                                                   # 10: blank
        "sku-8,imgs/a.jpg\n",                                  # 11: short row
        encoding="utf-8")
    skipped: list[str] = []
    items = list(sources.list_items(SourceConfig(manifest=str(manifest)), on_skip=skipped.append))
    got = {i.key: i for i in items}
    assert list(got) == ["sku-1", str(tmp_path / "b.jpg"), "sku-3", "sku-4", "sku-5", "sku-6",
                         "sku-8"]
    a = got["sku-1"]
    assert a.uri == str(tmp_path / "imgs" / "a.jpg") and a.size == 4
    assert a.fingerprint == f"4:{(tmp_path / 'imgs' / 'a.jpg').stat().st_mtime_ns}"
    assert a.extra == {"brand": "acme", "price": "10"}
    assert got[str(tmp_path / "b.jpg")].extra == {"brand": "multi\nline", "price": "5"}
    assert got["sku-3"].uri == str(absolute)
    web = got["sku-4"]
    assert web.uri == "https://cdn.example.com/x.jpg?v=2" and web.size is None
    assert web.fingerprint == "url:https://cdn.example.com/x.jpg?v=2"
    assert got["sku-8"].extra == {"brand": "", "price": ""}
    # Rows with an id but nothing to read are listed with their problem (failed, never sent).
    assert got["sku-5"].problem == "missing: no path or url value"
    assert got["sku-6"].problem == f"missing: {tmp_path / 'imgs' / 'missing.jpg'}"
    assert got["sku-6"].extra == {"brand": "gone", "price": "4"}
    assert all(got[k].problem is None for k in ("sku-1", "sku-3", "sku-4", "sku-8"))
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{manifest}:9"]
    assert "6 values" in skipped[0]


def test_jsonl_manifest_keeps_json_values_and_skips_bad_lines(tmp_path: Path, caplog) -> None:
    write(tmp_path / "a.jpg", b"a")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"id": 7, "path": "a.jpg", "tags": ["x", "y"], "meta": {"n": 1}}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
        json.dumps({"url": "http://127.0.0.1:9/z.png", "note": None}),
    ]) + "\n", encoding="utf-8")
    skipped: list[str] = []
    with caplog.at_level("WARNING", logger="ximrun.sources"):
        items = list(sources.list_items(SourceConfig(manifest=str(manifest)),
                                        on_skip=skipped.append))
    assert [i.key for i in items] == ["7", "http://127.0.0.1:9/z.png"]
    assert items[0].extra == {"tags": ["x", "y"], "meta": {"n": 1}}
    assert items[1].extra == {"note": None}
    assert skipped[0].startswith(f"{manifest}:2: bad JSON")
    assert skipped[1].startswith(f"{manifest}:3: a JSON object was expected")
    assert len(skipped) == 2 and f"{manifest}:2" in caplog.text


def test_manifest_on_s3_resolves_relative_paths_against_its_prefix(s3_bucket) -> None:
    b = s3_bucket
    b.put("catalog/imgs/a.jpg", b"aaa")
    b.put("catalog/list.ndjson", b'{"id": "a", "path": "imgs/a.jpg"}\n'
          b'{"id": "b", "path": "imgs/missing.jpg"}\n')
    source = SourceConfig(manifest=b.url("catalog/list.ndjson"), storage_options=b.storage_options)
    skipped: list[str] = []
    item, gone = sources.list_items(source, on_skip=skipped.append)
    etag = b.client.head_object(Bucket=b.name, Key="catalog/imgs/a.jpg")["ETag"].strip('"')
    assert (item.key, item.uri, item.fingerprint) == ("a", b.url("catalog/imgs/a.jpg"), f"3:{etag}")
    assert storage.read_bytes(item, source) == b"aaa"
    assert gone.key == "b" and gone.problem == f"missing: {b.url('catalog/imgs/missing.jpg')}"
    assert skipped == []


def test_check_manifest_names_duplicate_ids_and_their_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nsku-1,a.jpg\nsku-2,b.jpg\nsku-3,c.jpg\nsku-1,d.jpg\n"
                        ",e.jpg\n,e.jpg\nsku-2,f.jpg\nsku-2,g.jpg\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        manifests.check_manifest(SourceConfig(manifest=str(manifest)))
    message = str(err.value)
    assert "duplicate id 'sku-1' on lines 2 and 5" in message
    assert "duplicate id 'sku-2' on lines 3, 8 and 9" in message
    assert f"duplicate path '{tmp_path / 'e.jpg'}' on lines 6 and 7" in message
    assert "sku-3" not in message


def test_check_manifest_accepts_unique_ids_and_no_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\n" + "".join(f"sku-{i},{i}.jpg\n" for i in range(5000)),
                        encoding="utf-8")
    manifests.check_manifest(SourceConfig(manifest=str(manifest)))
    manifests.check_manifest(SourceConfig(paths=("x",)))


def test_unreadable_or_headless_manifests_raise_source_error(tmp_path: Path) -> None:
    no_column = tmp_path / "m.csv"
    no_column.write_text("id,file\n1,a.jpg\n", encoding="utf-8")
    with pytest.raises(SourceError, match="neither a path nor a url column"):
        manifests.check_manifest(SourceConfig(manifest=str(no_column)))
    with pytest.raises(SourceError, match="neither a path nor a url column"):
        list(sources.list_items(SourceConfig(manifest=str(no_column))))
    with pytest.raises(SourceError, match="no such manifest"):
        manifests.check_manifest(SourceConfig(manifest=str(tmp_path / "missing.csv")))
    with pytest.raises(SourceError, match=r"\.csv, \.jsonl or \.ndjson"):
        manifests.check_manifest(SourceConfig(manifest=str(tmp_path / "m.xlsx")))
