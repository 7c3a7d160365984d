"""What a run or a plan did (`Summary`), and what the caller asks of a run (`RunOptions`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from runner.classify import (
    CHANGED,
    CHANGED_REQUEST,
    KEPT_FAILED,
    NEW,
    RESUMED,
    RETRY,
    UNCHANGED,
)


@dataclass(frozen=True)
class RunOptions:
    limit: int | None = None  # stop after this many images were taken up
    budget: int | None = None  # overrides the job's [credits] budget; -1 (limits.NO_LIMIT): none
    max_credits: int | None = None  # overrides [credits] per_run
    max_duration: float | None = None  # seconds; overrides [run] max_duration


@dataclass
class Summary:
    """What a run (or a plan) did; the CLI prints it, --json dumps it, the runs row holds it."""

    job: str
    run_id: int | None = None
    status: str = "running"
    exit_code: int = 0
    message: str | None = None
    listed: int = 0
    new: int = 0
    changed: int = 0
    changed_request: int = 0
    unchanged: int = 0
    resumed: int = 0
    retried: int = 0
    kept_failed: int = 0
    skipped_rows: int = 0  # manifest rows that could not become an image (no id and no path, ...)
    skipped_first: str | None = None  # the first: "<manifest file name>:<line>: <why>"
    sent: int = 0
    done: int = 0
    failed: int = 0
    rejected: int = 0
    reused: int = 0
    requests: int = 0
    credits: int = 0
    credits_saved: int = 0
    pending: int = 0
    unavailable: int = 0  # images left pending because the service failed (not their records)
    missing: int = 0
    budget: int | None = None  # None: no budget
    stopped_by: str | None = None  # the limit that stopped the run (limits.REASONS)
    limits: dict[str, Any] = field(default_factory=dict)  # each limit and what is left of it
    account_before: int | None = None
    account_after: int | None = None
    account_limit: int | None = None  # the account's credits_limit at the end, if the API gives it
    # account_after - account_before - credits: what the account paid beyond what was recorded
    account_gap: int | None = None
    elapsed_s: float = 0.0
    listing_done: bool = False  # the listing was read to its end (the total to do is known)
    rejected_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def skipped(self, message: str, manifest: str | None) -> None:
        """Count a skipped manifest row (sources.py's "<manifest>:<line>: <why>"), keeping the
        first one with the manifest's file name only."""
        self.skipped_rows += 1
        if self.skipped_first is None:
            if manifest and message.startswith(f"{manifest}:"):
                name = manifest.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
                message = name + message[len(manifest):]
            self.skipped_first = message

    def account_gap_message(self, per_image: int, batches: int) -> str:
        """Why the account's counter moved otherwise than the credits recorded, most likely
        (`batches`: the batches the run sent, each one request unless retried)."""
        s = self
        moved = (s.account_after or 0) - (s.account_before or 0)
        gap = s.account_gap or 0
        paid = s.done - s.reused  # answers this run paid for
        text = (f"the account's credit counter moved {moved} during this run, but ximrun "
                f"recorded {s.credits} credit(s): {abs(gap)} {'more' if gap > 0 else 'fewer'} "
                "than recorded. ")
        causes = []
        if paid and moved > 0 and moved % paid == 0 and moved // paid != per_image:
            causes.append(f"[credits] per_image is {per_image}, but the account moved "
                          f"{moved // paid} per image answered: set per_image = {moved // paid}")
        if gap > 0 and s.requests > batches:
            causes.append(f"answers lost in flight: {s.requests - batches} request(s) "
                          "were sent again after a failure, and a request whose answer was "
                          "lost is billed anyway (see `ximrun status`: sent more than once)")
        causes.append("another client using the same account meanwhile")
        return text + "Likely: " + "; or ".join(causes)


ProgressFn = Callable[[Summary], None]
# Which Summary counter each classification of a listed image adds to.
KIND_COUNTERS = {NEW: "new", CHANGED: "changed", CHANGED_REQUEST: "changed_request",
                 UNCHANGED: "unchanged", RESUMED: "resumed", RETRY: "retried",
                 KEPT_FAILED: "kept_failed"}
