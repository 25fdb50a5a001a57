"""What every command-line entry point shares: one-line errors and exit codes.

A :class:`~vitrain.errors.VitrainError` (or a config key left without a value) ends the command with one
line, ``error: ...``, on stderr and exit code 1, no traceback (``trainer.debug=true`` or
``HYDRA_FULL_ERROR=1`` shows it). A training run stopped by SIGTERM/SIGINT exits with 128 + the signal's
number (143, 130), as a shell reports a process stopped by that signal.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf.errors import MissingMandatoryValue

from vitrain import runfolder
from vitrain.errors import Preempted, VitrainError, first_line
from vitrain.world import torchrun_world

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
        if optuna_trial():  # the sweeper records it as a failed trial, and the sweep goes on
            print(f"error: {error_message(e)}", file=sys.stderr)
            raise TrialFailed(error_message(e)) from None
        fail(error_message(e), rank)


def entry_point(main: Callable[[], None]) -> Callable[[], None]:
    """A command's ``main``: once it is done (or refused), the objects it leaves are frozen out of the garbage
    collector (``gc.freeze``), so that the interpreter's last collections at exit do not walk the millions of
    objects that importing torch, torchvision and timm makes: the process ends about 0.3 s after its last line,
    not 2-3 s (measured in docs/speed.md). Everything the command writes is closed before ``main`` returns."""

    @functools.wraps(main)
    def run() -> None:
        try:
            main()
        finally:
            gc.freeze()

    return run


class TrialFailed(Exception):
    """A trial of vitrain's Optuna sweep refused or failed: raised to the sweeper (which marks it FAIL, with this
    line as its reason) in place of ending the process, so that the other trials run."""


def optuna_trial() -> bool:
    """This run is a trial of vitrain's Optuna sweeper, in the sweep's process (Hydra's multirun)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return False
    return hydra_cfg.mode == RunMode.MULTIRUN and "VitrainOptunaSweeper" in str(hydra_cfg.sweeper.get("_target_"))


def resume_command(run_dir: str | Path) -> str:
    """The command that continues the Hydra run of this process in ``run_dir`` (its overrides, the launcher)."""
    from hydra.core.hydra_config import HydraConfig

    from vitrain.distributed import launcher

    overrides = " ".join(o for o in HydraConfig.get().overrides.task if not o.startswith("trainer.resume="))
    return f"{launcher()} -m vitrain.train {overrides} hydra.run.dir={run_dir} trainer.resume=auto"


def error_message(error: Exception) -> str:
    """The one line shown for ``error``."""
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key
        return f"{key} has no value; set it on the command line ({key}=...)"
    return first_line(error, limit=2000)


def fail(message: str, rank: int | None = None) -> None:
    """Print ``error: message`` (prefixed by the rank on ranks > 0 of a torchrun job) and exit with 1, taking away
    the run folder that this run made if it holds nothing of the run yet (:func:`vitrain.runfolder.discard_unused`)."""
    runfolder.discard_unused()
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
            if name not in options and group == "logger":  # a list group
                fail(f"unknown {group} '{name}'; choose from {', '.join(options)}, or several at once: "
                     f"{group}=[{','.join(options[:2])}]")
            if name not in options:
                near = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
                fail(f"unknown {group} '{name}'; {f'did you mean {near[0]}? ' if near else ''}choose from "
                     f"{', '.join(options)}")


def check_group_choices(args: Sequence[str], config_dir: Path, groups: Sequence[str] | None = None) -> None:
    """:func:`check_group_choice` for the config groups ``groups`` of ``config_dir`` (its folders of YAML options;
    all of them by default)."""
    for folder in sorted(p for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra"):
        if groups is None or folder.name in groups:
            check_group_choice(args, folder.name, sorted(p.stem for p in folder.glob("*.yaml")))


def _option_names(value: Any) -> list[str]:
    """The option names in an override's value: a name, a list of them, or a sweep (its ``list``) of either."""
    if isinstance(value, str | int | float | bool):
        return [str(value)]
    items = getattr(value, "list", value)
    return [name for item in items for name in _option_names(item)] if isinstance(items, list) else []


HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run",
               "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
FLAGS_WITH_VALUES = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                     "-cd", "--experimental-rerun", "--info", "-i"}


def overrides_of(args: Sequence[str]) -> list[str]:
    """The overrides of a command line (``key=value``, ``~key``, a bare word), without Hydra's flags and their values;
    an unknown flag (``--epochs=3``) ends the command in one line (argparse's usage text spans many)."""
    overrides, skip = [], False
    for arg in args:
        flag = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif arg.startswith("-") and flag not in HYDRA_FLAGS:
            fail(f"unknown option {arg}; vitrain takes key=value overrides (such as trainer.epochs=3) and Hydra's "
                 f"options (-m, --cfg job, --help)")
        elif arg.startswith("-"):
            skip = flag in FLAGS_WITH_VALUES and "=" not in arg and flag not in ("--info", "-i")
        else:
            overrides.append(arg)
    return overrides


def check_override_keys(args: Sequence[str], schema: type, config_dir: Path,
                        groups: Sequence[str] | None = None) -> None:
    """Before Hydra composes: an override that cannot be parsed, a sweep without ``-m``, a key that the dataclass
    ``schema`` lacks (even one added with ``+``), a key added with ``+`` that it has, or a value of the wrong type
    ends the command in one line naming the key and the nearest keys (Hydra's own errors span many lines and name
    none). Hydra's keys (``hydra.*``, ``hydra/...``) and the options of ``groups`` (the config groups the command
    takes; all of ``config_dir``'s by default: ``model=swin``, ``experiment=...``) pass untouched, and so does a key
    added with ``+`` to a schema that has ``extra_keys`` (``+model.depth=6``: checked against the model once the
    config is composed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser, given = OverridesParser.create(), overrides_of(args)
    if groups is None:
        groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra")
    multirun = any(a in ("-m", "--multirun") or a.startswith(("hparams_search=", "hydra.mode=")) for a in args)
    parsed = []
    for arg in given:
        try:
            parsed += parser.parse_overrides([arg])
        except Exception as e:
            fail(f"cannot parse the override '{arg}': {first_line(e).removeprefix('Error parsing override ')}; "
                 f"write key=value (quote a value with spaces or brackets: key='[a b]')")
    chosen = {o.key_or_group for o in parsed if o.key_or_group in groups}  # data=cifar10: data.root is then set
    structured = OmegaConf.structured(schema)  # values are tried on it as Hydra would (about 20 ms)
    for arg, override in zip(given, parsed, strict=True):
        key = override.key_or_group
        if re.split(r"[./]", key)[0] == "hydra" or key in groups:
            continue
        if override.is_sweep_override() and not multirun:
            fail(f"{arg} is a sweep (several values); add -m to run one job per value (python -m ... -m {arg})")
        message = _unknown_key(schema, key, override.is_add() or override.is_force_add(), groups)
        if message is None and override.is_add() and _field_type(schema, key) is not None:
            message = f"{key} exists already; set it without the +: {arg.lstrip('+')}"
        if message is None and not override.is_delete():
            message = _bad_value(schema, structured, key, override, chosen)
        if message:
            fail(message)


def unknown_key(key: str, known: Sequence[str], rest: str = "") -> str:
    """``unknown key KEY; did you mean ...?``: the names in ``known`` (the keys beside ``key``'s last part) closest
    to it (in any case: ``Trainer`` is ``trainer``), or all of them when none is close; ``rest`` is what followed the
    unknown part on the command line (``.epochs`` of ``Trainer.epochs``)."""
    prefix, _, name = key.rpartition(".")
    close = [k for k in known if k.lower() == name.lower()] or difflib.get_close_matches(name, list(known), n=3)
    full = [f"{prefix}.{k}" if prefix else k for k in (close or known)]
    return f"unknown key {key}{rest}; " + (f"did you mean {', '.join(f + rest for f in full)}?" if close
                                           else f"choose from {', '.join(full)}")


def _unknown_key(schema: type, key: str, added: bool, groups: Sequence[str]) -> str | None:
    """The one-line error for ``key`` (dotted) if the dataclass ``schema`` has no such key, through nested
    dataclasses; below a key of another type (a list, ``Any``) Hydra checks what it gets."""
    node, parts = schema, key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            extra = getattr(node, "extra_keys", None)  # what a key beyond the schema's is, where it may have one
            if extra is not None and (added or not difflib.get_close_matches(part, list(fields))):
                return None if added else f"unknown key {key}; {extra} is added with +: +{key}=..."
            return unknown_key(".".join(parts[:depth + 1]), list(dict.fromkeys([*fields, *groups])) if depth == 0
                               else list(fields), "".join(f".{p}" for p in parts[depth + 1:]))
        node = _dataclass_type(typing.get_type_hints(node)[part])
        if node is None:
            return None
    return None


def _bad_value(schema: type, cfg: Any, key: str, override: Any, chosen: set[str]) -> str | None:
    """The one-line error for a value of ``override`` that the schema's field ``key`` cannot hold (``abc`` or ``2.5``
    for an int, ``maybe`` for a bool: Hydra's own error spans many lines), tried as Hydra would, by assigning it
    to ``cfg``, the schema's structured config; each value of a ``a,b`` or ``choice(a,b)`` sweep is tried. Other
    sweeps (``interval``, ``range``) and interpolations pass. A key below a group that is null until chosen
    (evaluate's ``data``) needs its group among ``chosen``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    value = override.value()
    values = value.list if override.is_sweep_override() and hasattr(value, "list") else [value]
    if override.is_sweep_override() and not hasattr(value, "list"):
        return None
    parts = key.split(".")
    for depth in range(1, len(parts)):  # a key below a group that is null until chosen (evaluate's data)
        parent = ".".join(parts[:depth])
        if parent not in chosen and OmegaConf.select(cfg, parent, default="") is None:
            return f"{key}: {parent} is not chosen; choose it first ({parent}=<option>, e.g. {parent}=imagefolder)"
    boolean = _field_type(schema, key) in (bool, bool | None)
    for item in values:
        if isinstance(item, str) and "${" in item:
            continue
        if boolean and isinstance(item, int | float) and not isinstance(item, bool):
            return f"{key} must be true or false, got {item}"  # OmegaConf would take 2 for true
        try:
            OmegaConf.update(cfg, key, item, merge=True)
        except ValidationError as e:
            return _value_message(key, item, first_line(e))
        except Exception:  # not a key of the schema (a model's argument added with +): checked once composed
            return None
    return None


VALUE_MESSAGES = (  # what OmegaConf's refusal says -> the line vitrain gives
    (("to Integer",), "{key} must be a whole number, got {shown}"),
    (("to Float",), "{key} must be a number (such as 0.1 or 1e-3), got {shown}"),
    (("valid bool",), "{key} must be true or false, got {shown}"),
    (("is not Optional",), "{key} cannot be null; give it a value"),
    (("Dict[", "DictConfig"), "{key} must be a mapping in braces ({key}={{...}}), got {shown}"),
    (("is not a subclass of",), "{key} is a group of keys; set one of them ({key}.<name>=...), not {shown}"),
    (("Cannot convert 'list'",), "{key} must be one value, not a list, got {shown}"),
    (("ListConfig",), "{key} must be a list in brackets ({key}=[...]), got {shown}"),
)


def _value_message(key: str, value: Any, reason: str) -> str:
    shown = "null" if value is None else value
    for markers, line in VALUE_MESSAGES:
        if any(marker in reason for marker in markers):
            return line.format(key=key, shown=shown)
    return f"{key}={shown}: {reason}"


def _field_type(schema: type, key: str) -> Any:
    """The type hint of the field ``key`` (dotted) of the dataclass ``schema``, or None."""
    node: Any = schema
    hint = None
    for part in key.split("."):
        if node is None or part not in {f.name for f in dataclasses.fields(node)}:
            return None
        hint = typing.get_type_hints(node)[part]
        node = _dataclass_type(hint)
    return hint


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass of a field's type hint (``X`` or ``X | None``), or None for any other type."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None
