"""How a run ends: its status, exit code and message (docs/contract.md, "Exit codes of
`run`"), its figures against the account's, and its row finished. The run's last step
(`Run.execute`)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from runner.errors import AuthError, ExitCode
from runner.limits import DURATION, MONEY, stop_message
from runner.records import FAILED, PENDING
from runner.wire import account_figure

if TYPE_CHECKING:
    from runner.run import Run

log = logging.getLogger("ximrun.run")


def settle(run: Run, stopped_by: str | None, listing_complete: bool) -> None:
    """Decide the exit code from the images of this listing (docs/contract.md) and finish the
    run's row; `stopped_by` is why the executor stopped early, or None."""
    s = run.summary
    if run.auth_error is not None:
        s.status, s.exit_code, s.message = "auth_refused", ExitCode.AUTH, str(run.auth_error)
    else:
        if stopped_by != "unavailable":  # a dead service would only make the run wait
            with contextlib.suppress(AuthError):
                details = run.client.account_details()
                s.account_after = account_figure(details)
                s.account_limit = account_figure(details, "credits_limit")
        if listing_complete:
            src = run.job.source
            run.store.mark_missing(run.job.name, run.run_id,
                                   unique_listing=len(src.paths) + bool(src.manifest) == 1)
        s.pending = run.store.count_listed(run.job.name, PENDING)
        failed = run.store.count_listed(run.job.name, FAILED)
        if stopped_by == "interrupted":
            s.status, s.exit_code = "interrupted", ExitCode.INTERRUPTED
        elif stopped_by == "unavailable":
            s.status, s.exit_code = "api_unavailable", ExitCode.UNAVAILABLE
            s.message = (f"the API is unavailable {run.client.breaker.describe()}; the "
                         f"circuit breaker opened and no new batch was sent. {s.pending} "
                         "image(s) left pending, none marked failed for it; the next run "
                         "continues" + (f" ({failed} image(s) failed: the API refused "
                                        "their records)" if failed else ""))
        elif stopped_by == DURATION or (stopped_by in (*MONEY, "limit") and s.pending):
            s.status, s.exit_code = f"stopped_by_{stopped_by}", ExitCode.STOPPED
            if stopped_by != "limit":
                s.stopped_by = stopped_by
                s.message = stop_message(stopped_by, run.limits.left())
        elif s.pending:
            # The service failed some batches to the end of their retries (or a Dask worker
            # got no word from the coordinator about a retry's row, and did not send it):
            # nothing of theirs is marked failed, and the next plain run sends them. Exit 0
            # says every image is final, so images left pending for any other cause end here
            # too.
            s.status, s.exit_code = "finished_with_pending", ExitCode.UNAVAILABLE
            why = (f"{s.unavailable} image(s) got no answer after their retries (last error: "
                   f"{run.service_error})" if s.unavailable else "they were not answered")
            s.message = (f"{s.pending} image(s) left pending: {why}; the next run sends them"
                         + (f"; {failed} image(s) failed" if failed else ""))
        elif failed:
            s.status, s.exit_code = "finished_with_failures", ExitCode.FAILURES
            s.message = f"{failed} image(s) failed; see `ximrun status` or `ximrun export`"
        else:
            s.status, s.exit_code = "finished", ExitCode.OK
    s.missing = run.store.missing_count(run.job.name)
    if s.account_before is not None and s.account_after is not None:
        s.account_gap = s.account_after - s.account_before - s.credits
        if s.account_gap:
            log.warning("%s", run.summary.account_gap_message(run.per_image, run.batch_no))
    s.limits = run.limits.left()
    run.store.finish_run(run.run_id, status=s.status, exit_code=s.exit_code,
                         account_after=s.account_after, account_gap=s.account_gap,
                         skipped_rows=s.skipped_rows, skipped_first=s.skipped_first)
