"""The `ximrun` command line: parse arguments, call the library, print, map errors to exit codes.

`common` holds the group and what every command shares; `run` (run, plan), `inspect` (status,
export, retry, report) and `tools` (check, sandbox, demo) add their commands to it.
"""

from __future__ import annotations

import threading

import click

from runner.cli import common, inspect, run, tools  # noqa: F401 -- each adds its commands
from runner.cli.common import ENVVAR_PREFIX, fail, main
from runner.errors import RunnerError

__all__ = ["entry", "main"]


def _envvars(group: click.Group) -> None:
    """Each option's variable is named after its long flag (`run --json`: XIMRUN_RUN_JSON, where
    click's automatic name would follow the parameter, XIMRUN_RUN_AS_JSON); `--help` shows it."""
    for name, cmd in group.commands.items():
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.is_eager:
                flag = next((o for o in param.opts if o.startswith("--")), None)
                if flag:
                    param.envvar = (f"{ENVVAR_PREFIX}_{name}_{flag[2:]}".upper()
                                    .replace("-", "_"))
                param.show_envvar = True


_envvars(main)


def entry(early_stop: threading.Event | None = None) -> None:
    """The console script: every RunnerError that escaped becomes a message, never a traceback.
    `early_stop` is set by a signal that came before the commands could handle it."""
    common.early_stop = early_stop
    try:
        main(auto_envvar_prefix=ENVVAR_PREFIX)
    except RunnerError as exc:
        fail(str(exc), exc.exit_code)

