"""What every command-line entry point shares: one-line errors and exit codes.

A :class:`~vitrain.errors.VitrainError` (or a config key left without a value) ends the command with one
line, ``error: ...``, on stderr and exit code 1, no traceback (``trainer.debug=true`` or
``HYDRA_FULL_ERROR=1`` shows it). A training run stopped by SIGTERM/SIGINT exits with 128 + the signal's
number (143, 130), as a shell reports a process stopped by that signal.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from omegaconf.errors import MissingMandatoryValue

from vitrain.distributed import torchrun_world
from vitrain.errors import Preempted, VitrainError, first_line

T = TypeVar("T")


def run_command(main: Callable[[], T], debug: bool = False,
                on_preempted: Callable[[Preempted], None] | None = None) -> T:
    """Call ``main()`` and turn user errors into one line and an exit code (see the module's docstring)."""
    rank = torchrun_world().rank
    try:
        return main()
    except Preempted as e:
        if on_preempted is not None:
            on_preempted(e)
        sys.exit(128 + e.signum)
    except (VitrainError, MissingMandatoryValue) as e:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(error_message(e), rank)


def error_message(error: Exception) -> str:
    """The one line shown for ``error``."""
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key
        return f"{key} has no value; set it on the command line ({key}=...)"
    return first_line(error, limit=2000)


def fail(message: str, rank: int | None = None) -> None:
    """Print ``error: message`` (prefixed by the rank on ranks > 0 of a torchrun job) and exit with 1."""
    rank = torchrun_world().rank if rank is None else rank
    print(f"{f'[rank {rank}] ' if rank else ''}error: {message}", file=sys.stderr)
    sys.exit(1)


def check_group_choice(args: Sequence[str], group: str, options: Sequence[str]) -> None:
    """Before Hydra composes: an option of the config group ``group`` that ``args`` (the command line) choose but
    ``options`` lack ends the command in one line listing the options (Hydra's own error spans many lines).
    ``group=a``, ``group=[a,b]`` and sweeps (``group=a,b``) are read by Hydra's override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [a for a in args if re.match(rf"[~+]*{re.escape(group)}(@\S*)?=", a)]
    try:
        overrides = OverridesParser.create().parse_overrides(given)
    except Exception:  # malformed: Hydra says so itself
        return
    for override in overrides:
        for name in _option_names(override.value()):
            if name not in options:
                fail(f"unknown {group} '{name}'; choose from {', '.join(options)}, or several at once: "
                     f"{group}=[{','.join(options[:2])}]")


def _option_names(value: Any) -> list[str]:
    """The option names in an override's value: a name, a list of them, or a sweep (its ``list``) of either."""
    if isinstance(value, str):
        return [value]
    items = getattr(value, "list", value)
    return [name for item in items for name in _option_names(item)] if isinstance(items, list) else []
