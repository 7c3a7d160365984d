"""Pieces of the pipeline that the end-to-end tests cannot see: how a task's reads are grouped."""

from __future__ import annotations

from runner.prepare import FETCH_BYTES, FETCH_UNKNOWN_SIZE, fetch_groups
from runner.records import Item


def item(uri: str, size: int | None) -> Item:
    return Item(uri, uri, size, "fp")


def test_local_files_are_read_one_at_a_time_and_remote_objects_together_up_to_a_byte_budget():
    big = FETCH_BYTES // 3 + 1  # two fit in a group, not three
    items = [item("/photos/a.jpg", 10), item("s3://b/1.jpg", big), item("s3://b/2.jpg", big),
             item("s3://b/3.jpg", big), item("/photos/c.jpg", 1), item("s3://b/4.jpg", None),
             item("s3://b/huge.jpg", 3 * FETCH_BYTES), item("s3://b/5.jpg", 1)]
    groups = list(fetch_groups(items, range(len(items))))
    assert groups == [[0], [1, 2], [4], [3, 5], [6], [7]]
    # Every image is read exactly once; no remote group passes the budget unless alone.
    assert sorted(i for g in groups for i in g) == list(range(len(items)))
    for g in groups:
        sizes = [items[i].size if items[i].size is not None else FETCH_UNKNOWN_SIZE for i in g]
        assert len(g) == 1 or sum(sizes) <= FETCH_BYTES


def test_small_remote_objects_of_a_task_are_fetched_in_one_group():
    items = [item(f"s3://b/{i}.jpg", 200 * 1024) for i in range(10)]
    assert list(fetch_groups(items, [0, 2, 4, 6, 8])) == [[0, 2, 4, 6, 8]]


def test_a_local_file_that_grew_after_its_size_was_taken_is_read_whole_up_to_the_byte_limit(
        tmp_path, monkeypatch):
    # A read takes what the file held when its size was taken, and a byte more to see whether
    # it grew since; then it reads on, but never past max_bytes.
    import os

    import pytest

    from runner import storage
    from runner.errors import ReadError

    path = tmp_path / "growing.jpg"
    path.write_bytes(bytes(range(256)) * 20)  # 5,120 bytes
    real = os.fstat

    def taken_earlier(fd: int) -> os.stat_result:
        st = real(fd)
        return os.stat_result((*st[:6], 1000, *st[7:10]))

    monkeypatch.setattr(storage.os, "fstat", taken_earlier)
    assert storage._read_local(str(path), None, 10_000) == path.read_bytes()
    with pytest.raises(ReadError, match="^too_large_file: .* is larger, over images.max_bytes"):
        storage._read_local(str(path), None, 3000)
    monkeypatch.setattr(storage.os, "fstat", real)
    assert storage._read_local(str(path), None, 5120) == path.read_bytes()
    with pytest.raises(ReadError, match="is 5120 bytes"):
        storage._read_local(str(path), None, 5119)
