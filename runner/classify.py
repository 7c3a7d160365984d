"""How a listed image relates to what the state database holds: new, changed, unchanged, ... .

These kinds are what `plan` counts and what the run sends; the SQL that finds the rows is the
store's, the decision for each row is here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from runner.records import DONE, FAILED, REJECTED, Item

NEW, CHANGED, CHANGED_REQUEST, UNCHANGED, RESUMED, RETRY, KEPT_FAILED = (
    "new", "changed", "changed_request", "unchanged", "resumed", "retry", "kept_failed")
TO_SEND = frozenset({NEW, CHANGED, CHANGED_REQUEST, RESUMED, RETRY})
RETRY_REASON = "retry requested"  # the reason `ximrun retry` leaves on a pending image


@dataclass(frozen=True)
class Listed:
    """A listed item and what the database says must happen to it."""

    item: Item
    kind: str  # one of NEW, CHANGED, ... above


@dataclass(frozen=True)
class Classified:
    """A classified chunk of a listing: how many of each kind, and every image that is not simply
    unchanged (those are only counted)."""

    counts: dict[str, int]
    listed: list[Listed]

    @property
    def to_send(self) -> list[Listed]:
        return [x for x in self.listed if x.kind in TO_SEND]


def decide(items: Iterable[Item], known: dict[str, tuple[Any, ...]], request_sig: str,
           prep_sig: str) -> list[Listed]:
    """The kind of each item, from its row: key -> (fingerprint, state, reason, request_sig,
    prep_sig); absent: new."""
    out: list[Listed] = []
    for it in items:
        row = known.get(it.key)
        if row is None:
            out.append(Listed(it, NEW))
            continue
        fingerprint, state, reason, req_sig, row_prep_sig = row
        if it.problem is not None and state == DONE and req_sig == request_sig:
            # A manifest row whose photo is gone keeps the answer it paid for.
            kind = UNCHANGED
        elif fingerprint != it.fingerprint:
            kind = CHANGED
        elif state == DONE:
            kind = UNCHANGED if req_sig == request_sig else CHANGED_REQUEST
        elif state == REJECTED:
            # A rejection belongs to the format policy: a new policy looks again.
            kind = UNCHANGED if row_prep_sig == prep_sig else CHANGED
        elif state == FAILED:
            kind = KEPT_FAILED
        else:
            kind = RETRY if reason == RETRY_REASON else RESUMED
        out.append(Listed(it, kind))
    return out


def classified(items: Sequence[Item], decided: list[Listed]) -> Classified:
    """Counts for the whole chunk: what was not decided (filtered out by SQL) is unchanged."""
    listed = [x for x in decided if x.kind != UNCHANGED]
    counts: dict[str, int] = {}
    for x in listed:
        counts[x.kind] = counts.get(x.kind, 0) + 1
    unchanged = len(items) - len(listed)
    if unchanged:
        counts[UNCHANGED] = unchanged
    return Classified(counts, listed)
