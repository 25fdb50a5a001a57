"""Summarise a sweep: one row per run, the best first, with the overrides that differ between runs.

    python scripts/summarize_runs.py outputs/multirun/2025-06-01/12-00-00
    python scripts/summarize_runs.py outputs/multirun --metric best_top1 --csv sweep.csv
    python scripts/summarize_runs.py SWEEP_DIR --markdown          # a table to paste into a document

A run is any folder below SWEEP_DIR (at any depth) that holds ``.hydra/overrides.yaml``; its
``metrics.json`` gives the metric columns. Runs without metrics.json (failed, or still running) are
listed last, marked as such. Overrides shared by every run are printed once above the table. Runs of a
pruned Optuna search show their state (``complete``, or ``pruned``: stopped early) and the epochs they trained.
When a sweep folder holds Optuna's ``optimization_results.yaml``, its best value and parameters follow.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("final_top1", "best_top1", "wall_time_sec")  # shown after the sort metric
STATE_COLUMNS = ("state", "epochs_trained")  # shown when a run has them (metrics.json of a Trainer that has them)
FORMATS = {"final_top1": ".2f", "best_top1": ".2f", "wall_time_sec": ".1f", "final_val_loss": ".4f",
           "train_images_per_sec": ".0f"}
NO_METRICS = "no metrics.json"


@dataclass
class Run:
    name: str  # the run folder, relative to the sweep folder
    overrides: dict[str, str]  # key -> value, as given on the command line or by the sweeper
    metrics: dict[str, Any] | None  # metrics.json, or None when it is missing or unreadable


def natural_key(name: str) -> list[Any]:
    """Sort ``2`` before ``10``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def read_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of ``key=value`` strings) as a dict."""
    pairs = (item.split("=", 1) for item in yaml.safe_load(path.read_text()) or [])
    return {p[0]: p[1] if len(p) == 2 else "" for p in pairs}


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every run folder below ``sweep_dir``, in natural order of their names."""
    runs = []
    for overrides in sweep_dir.rglob(".hydra/overrides.yaml"):
        run_dir = overrides.parent.parent
        name = run_dir.relative_to(sweep_dir).as_posix()
        runs.append(Run(name, read_overrides(overrides), read_metrics(run_dir)))
    return sorted(runs, key=lambda r: natural_key(r.name))


def check_metric(runs: list[Run], metric: str) -> None:
    """Stop with the keys there are when no finished run has ``metric`` (a typo in --metric)."""
    finished = [r.metrics for r in runs if r.metrics is not None]
    if finished and not any(metric in m for m in finished):
        keys = sorted({k for m in finished for k in m if k != "history"})
        raise SystemExit(f"error: no run has {metric} in its metrics.json; choose one of {', '.join(keys)}")


def sort_runs(runs: list[Run], metric: str, lower_is_better: bool = False) -> list[Run]:
    """Finished runs by ``metric``, best first; then runs without the metric; then those without metrics.json."""
    def key(run: Run) -> tuple[int, float]:
        value = (run.metrics or {}).get(metric)
        if value is None:
            return (1 if run.metrics is not None else 2, 0.0)
        return (0, value if lower_is_better else -value)

    return sorted(runs, key=key)  # stable: ties keep the natural order


def split_overrides(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """The override keys whose values differ between runs, and those every run shares (with their value)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    common = {k: runs[0].overrides[k] for k in keys
              if all(k in run.overrides and run.overrides[k] == runs[0].overrides[k] for run in runs)}
    return [k for k in keys if k not in common], common


def format_value(value: Any, fmt: str = ".4g") -> str:
    """Numbers (also numbers given as text, like override values) to ``fmt``; anything else as is."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = float(value) if re.search(r"[.eE]", value) else value
        except ValueError:
            return value
    return format(value, fmt) if isinstance(value, float) else str(value)


def table(runs: list[Run], metric: str, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the run, the metric, the other metric columns (the state of pruned searches' runs), the
    overrides that differ."""
    metrics = [metric, *(c for c in COLUMNS if c != metric)]
    metrics += [c for c in STATE_COLUMNS if c != metric and any(c in (r.metrics or {}) for r in runs)]
    rows = []
    for run in runs:
        if run.metrics is None:
            cells = [NO_METRICS] + [""] * (len(metrics) - 1)
        else:
            cells = [format_value(run.metrics.get(m), FORMATS.get(m, ".4g")) for m in metrics]
        rows.append([run.name, *cells, *(format_value(run.overrides.get(k)) for k in keys)])
    return ["run", *metrics, *keys], rows


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """Columns padded to one width; ``markdown``: a pipe table, otherwise plain text for the terminal."""
    if markdown:
        header, rows = [h.replace("|", r"\|") for h in header], [[c.replace("|", r"\|") for c in r] for r in rows]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    rule = ["-" * w for w in widths]
    lines = [[c.ljust(w) for c, w in zip(line, widths, strict=True)] for line in [header, rule, *rows]]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    return "\n".join("  ".join(line).rstrip() for line in lines)


def write_csv(path: Path, runs: list[Run], metric: str) -> None:
    """All runs, every metric of metrics.json (but the per-epoch history) and every override key."""
    metric_keys = list(dict.fromkeys(k for r in runs for k in (r.metrics or {}) if k != "history"))
    metric_keys = [metric, *(k for k in metric_keys if k != metric)]
    override_keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "status", *metric_keys, *override_keys])
        for r in runs:
            status = "finished" if r.metrics is not None else NO_METRICS
            writer.writerow([r.name, status, *((r.metrics or {}).get(k, "") for k in metric_keys),
                             *(r.overrides.get(k, "") for k in override_keys)])


def optuna_report(sweep_dir: Path) -> list[str]:
    """One line per ``optimization_results.yaml`` below ``sweep_dir``: the best value and parameters."""
    lines = []
    for path in sorted(sweep_dir.rglob("optimization_results.yaml")):
        result = yaml.safe_load(path.read_text()) or {}
        where = path.relative_to(sweep_dir).as_posix()
        if "best_value" in result:
            params = " ".join(f"{k}={format_value(v)}" for k, v in (result.get("best_params") or {}).items())
            lines.append(f"Optuna best value {format_value(result['best_value'], '.2f')} ({where}): {params}")
        for solution in result.get("solutions", []):  # a multi-objective study: its Pareto front
            params = " ".join(f"{k}={format_value(v)}" for k, v in solution["params"].items())
            lines.append(f"Optuna Pareto solution {solution['values']} ({where}): {params}")
    return lines


def summarize(sweep_dir: Path, metric: str = "final_top1", markdown: bool = False,
              lower_is_better: bool = False) -> str:
    """The whole report as text: shared overrides, the table, the unfinished count, Optuna's best."""
    runs = sort_runs(find_runs(sweep_dir), metric, lower_is_better)
    if not runs:
        raise SystemExit(f"error: no run folders (with .hydra/overrides.yaml) under {sweep_dir}")
    check_metric(runs, metric)
    keys, common = split_overrides(runs)
    parts = []
    if common and len(runs) > 1:
        parts.append("in every run: " + " ".join(f"{k}={v}" for k, v in common.items()))
    parts.append(render(*table(runs, metric, keys), markdown=markdown))
    in_order = sorted(runs, key=lambda r: natural_key(r.name))  # the lists below name runs in their own order
    for state, what in ((None, "have no metrics.json (failed or unfinished)"),
                        ("preempted", "were stopped by a signal (preempted; trainer.resume=auto continues them)"),
                        ("pruned", "were pruned (stopped early by the search's pruner)")):
        named = [r.name for r in in_order if (r.metrics is None if state is None else
                                               (r.metrics or {}).get("state") == state)]
        if named:
            parts.append(f"{len(named)} of {len(runs)} runs {what}: " + ", ".join(named))
    parts.extend(optuna_report(sweep_dir))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--metric", default="final_top1", help="the metrics.json key to sort by (default final_top1)")
    parser.add_argument("--lower-is-better", action="store_true", help="sort ascending (for a loss or a time)")
    parser.add_argument("--csv", type=Path, help="also write every run, metric and override to this CSV file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain text")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a folder")
    print(summarize(args.sweep_dir, args.metric, args.markdown, args.lower_is_better))
    if args.csv:
        runs = sort_runs(find_runs(args.sweep_dir), args.metric, args.lower_is_better)
        write_csv(args.csv, runs, args.metric)


if __name__ == "__main__":
    main()
