"""The console script's first code: SIGINT and SIGTERM are caught before anything slow loads.

Between the interpreter's start and `run` installing its graceful stop, click, the job loader and
the pipeline are imported. A signal then used to end in a traceback (SIGINT) or a kill without
exit code 4 (SIGTERM). Here it is only remembered: `run` starts stopped (exit 4, nothing sent),
any other command leaves quietly with 130.
"""

from __future__ import annotations

import signal
import threading

EARLY_STOP = threading.Event()


def _remember(signum: int, frame: object) -> None:
    EARLY_STOP.set()


def main() -> None:
    signal.signal(signal.SIGINT, _remember)
    signal.signal(signal.SIGTERM, _remember)
    from runner import cli

    cli.entry(EARLY_STOP)
