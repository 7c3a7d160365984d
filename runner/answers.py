"""What is stored of an answer and of a listed image: the compact JSON, a reused copy's own
record, the manifest columns; the timestamps every row carries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from runner.records import Item, RecordOutcome


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Answer(NamedTuple):
    """An answer already paid for some bytes: where it is stored and what was sent with it."""

    job: str
    key: str
    result: str  # the record as stored (JSON)
    extra: dict[str, Any] | None  # the manifest columns sent with it; None: not known (v1 rows)


# Keys of a record that say what was sent, not what the service found.
_SENT_KEYS = frozenset({"_id", "_base64", "_url"})


def reused_record(record: Mapping[str, Any] | str, item: Item,
                  source_extra: Mapping[str, Any] | None) -> str:
    """The record `item` gets from an answer paid by another image (as compact JSON): its own
    `_id` and manifest columns, and only the service's analysis of the answer: every key but
    `_id`, the image sent and the manifest columns the paying image was sent with
    (`source_extra`; None when they were not stored, before schema version 2: then a top-level
    key without a leading `_` holding a string, number, boolean or null is taken for one)."""
    if isinstance(record, str):
        record = json.loads(record)
    assert isinstance(record, dict)
    if source_extra is not None:
        sent = set(source_extra)

        def analysis(k: str, v: Any) -> bool:
            return k not in sent
    else:
        def analysis(k: str, v: Any) -> bool:
            return k.startswith("_") or not (v is None or isinstance(v, str | int | float | bool))

    own: dict[str, Any] = {"_id": item.key}
    own.update((k, v) for k, v in item.extra.items() if k not in _SENT_KEYS)
    own.update((k, v) for k, v in record.items() if k not in _SENT_KEYS and analysis(k, v))
    return compact_json(own)


def listed_row(it: Item) -> tuple[Any, ...]:
    """An item as the run's listing holds it: key, fingerprint and, for a manifest row with
    columns, their JSON."""
    return (it.key, it.fingerprint, extra_json(it.extra)) if it.extra else (it.key,
                                                                              it.fingerprint)


def extra_json(extra: Mapping[str, Any]) -> str:
    """An item's manifest columns as stored in items.extra ('{}' for none)."""
    return listing_json(dict(extra)) if extra else "{}"


@dataclass(frozen=True)
class BatchAnswer:
    """One image's outcome, ready to be written with its batch."""

    item: Item
    outcome: RecordOutcome
    content_hash: str | None
    followers: tuple[Item, ...] = ()  # identical bytes of this run that wait for this answer


# An answer as stored: no separator spaces. One encoder for every call: json.dumps with options
# builds a new one each time.
compact_json = json.JSONEncoder(separators=(",", ":")).encode

# Keys in any script as UTF-8, not escapes; no separator spaces; tuples of strings need no check
# for cycles.
listing_json = json.JSONEncoder(ensure_ascii=False, check_circular=False,
                                 separators=(",", ":")).encode

