"""The local emulator of the image-recognition API: real HTTP on loopback, faults on demand, a ledger.

`Sandbox(settings).start()` serves in a thread (tests, the embedded "sandbox" endpoint);
`serve(settings, host, port)` serves in the foreground (`ximrun sandbox`).
"""

from runner.sandbox.server import IDLE_TIMEOUT_S, Sandbox, serve
from runner.sandbox.service import LedgerEntry

__all__ = ["IDLE_TIMEOUT_S", "LedgerEntry", "Sandbox", "serve"]
