"""Progress on stderr: a bar on a terminal, plain periodic log lines under cron."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from runner.cli.common import LOG_EVERY_S

log = logging.getLogger("ximrun")


class Progress:
    """A tqdm bar on a terminal; under cron, a plain line every `every` seconds instead.

    The total is not known while the listing streams: until it ends the bar counts without a
    total (no percentage, no ETA that would go backwards as the total grows), then it becomes
    the real bar. Off a terminal one line says when the listing ended and what it found."""

    def __init__(self, enabled: bool, every: float = LOG_EVERY_S) -> None:
        self.bar = None
        self.every = every
        self.last_line = time.monotonic()
        self.started = time.monotonic()
        self.enabled = enabled
        self.listing_logged = False
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", file=sys.stderr, dynamic_ncols=True,
                            desc="ximrun: listing")

    def __call__(self, s: Any) -> None:
        if not self.enabled:
            return
        settled = s.done + s.failed + s.rejected
        todo = s.new + s.changed + s.changed_request + s.resumed + s.retried
        if self.bar is not None:
            if s.listing_done and self.bar.total != todo:
                self.bar.total = todo
                self.bar.set_description("ximrun", refresh=False)
            self.bar.n = settled
            postfix = {"listed": s.listed} if not s.listing_done else {}
            self.bar.set_postfix(**postfix, done=s.done, failed=s.failed, rejected=s.rejected,
                                 credits=s.credits, refresh=False)
            self.bar.refresh()
            return
        if s.listing_done and not self.listing_logged:
            self.listing_logged = True
            log.info("listing done: %d listed (new %d, changed %d, unchanged %d, resumed %d, "
                     "failed before %d): %d to do", s.listed, s.new,
                     s.changed + s.changed_request, s.unchanged, s.resumed + s.retried,
                     s.kept_failed, todo)
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            rate = settled / max(now - self.started, 1e-9)
            total = str(todo) if s.listing_done else f"{todo} so far (listing: {s.listed})"
            log.info("progress: %d/%s settled (done %d, failed %d, rejected %d), %.1f img/s, "
                     "credits %d", settled, total, s.done, s.failed, s.rejected, rate, s.credits,
                     extra={"event": "progress", "settled": settled, "todo": todo,
                            "listing_done": s.listing_done, "done": s.done,
                            "failed": s.failed, "rejected": s.rejected,
                            "images_per_s": round(rate, 2), "credits": s.credits})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


