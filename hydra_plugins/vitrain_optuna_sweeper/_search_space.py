"""``hydra.sweeper.params`` and the command line's sweeps as Optuna distributions, and back to overrides.

The grammar is Hydra's override syntax:

- ``interval(a, b)``: a float in [a, b]; ``int(interval(a, b))``: an integer; ``tag(log, ...)``: log-uniform.
- ``range(a, b[, step])``: a to b by step, ``b`` included (as hydra-optuna-sweeper reads it; Hydra's basic
  sweeper excludes it, as Python's range does), as an integer or stepped float distribution;
  ``shuffle(range(...))``: a categorical of Hydra's values (``b`` excluded).
- ``choice(x, y, ...)`` and ``x,y,...``: a categorical.
- anything else is a fixed override, passed to every trial as written.

This module is imported only when a sweep starts (Hydra's plugin scan skips names that begin with ``_``), so a
vitrain without the ``sweep`` extra never imports Optuna.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


@dataclass
class SearchSpace:
    """The searched parameters, the fixed overrides, and how each categorical choice is written back."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)  # overrides every trial gets unchanged
    choice_texts: dict[str, list[str]] = field(default_factory=dict)  # per categorical: its choices as overrides

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's overrides: its suggested ``params`` in override syntax, then the fixed ones."""
        return [f"{name}={self._text(name, value)}" for name, value in params.items()] + self.fixed

    def _text(self, name: str, value: Any) -> str:
        if name in self.choice_texts:
            return self.choice_texts[name][self.distributions[name].to_internal_repr(value)]
        return Transformer.str(value)


def parse_search_space(arguments: Sequence[str]) -> SearchSpace:
    """The search space of ``arguments`` (overrides, as ``key=value`` text); a later key replaces an earlier one."""
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        name = override.get_key_element()
        space.distributions.pop(name, None)
        space.choice_texts.pop(name, None)
        space.fixed = [f for f in space.fixed if not f.startswith(f"{name}=")]
        if not override.is_sweep_override():
            space.fixed.append(override.input_line)
            continue
        space.distributions[name] = distribution(override)
        if isinstance(space.distributions[name], CategoricalDistribution):
            space.choice_texts[name] = [Transformer.str(v) for v in _sweep_values(override)]
    return space


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (see the module's docstring)."""
    value, name = override.value(), override.get_key_element()
    if not isinstance(value, (IntervalSweep, RangeSweep, ChoiceSweep)):
        raise ValueError(f"{name}: {override.get_value_string()} cannot be searched by Optuna; use interval(), "
                         "range() or choice()")
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if "log" in value.tags:
        raise ValueError(f"{name}: tag(log, ...) applies to interval(...) only")
    if isinstance(value, RangeSweep) and not value.shuffle:
        start, stop, step = value.start, value.stop, value.step
        if step <= 0 or start > stop:
            raise ValueError(f"{name}: {override.get_value_string()} is empty (an Optuna sweep's range runs up from "
                             f"start to stop, stop included)")
        steps = int((stop - start) / step + 1e-9)  # the last value reached, at or below stop
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(start, start + steps * step, step=step)
        return FloatDistribution(float(start), float(start) + steps * float(step), step=float(step))
    return CategoricalDistribution([Transformer.encode(v) for v in _sweep_values(override)])


def _sweep_values(override: Override) -> list[Any]:
    """The values a choice or range sweep lists, in its order (a shuffled range: ascending)."""
    value = override.value()
    if isinstance(value, RangeSweep) and value.shuffle:
        return sorted(override.sweep_iterator())
    return list(override.sweep_iterator())


def grid(distributions: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """``GridSampler``'s search space: every value of each discrete distribution (choices, ranges, integers)."""
    values = {}
    for name, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            values[name] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            values[name] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            values[name] = [d.low + i * d.step for i in range(round((d.high - d.low) / d.step) + 1)]
        else:
            raise ValueError(f"the grid sampler needs choice() or range() for {name}, not a continuous interval")
    return values
