"""How long the commands take to answer and to leave: the import cost of each entry point (``python -X importtime``),
the wall time of a refused value and of ``--help``, and the time from a training run's last line to its exit.

    python scripts/startup_times.py [--rounds 3] [--out docs/startup_times.json]

Each figure is the median of ``--rounds`` fresh processes, run one after the other (nothing else should run on the
machine). A refused value must be refused before torch, torchvision and timm are imported: the table says whether
each command imported them.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

COMMANDS = {  # entry point: a value its config refuses (the checkpoint need not exist: the value is checked first)
    "train": ["optimizer.lr=-1"],
    "evaluate": ["checkpoint=none.pt", "batch_size=0"],
    "predict": ["checkpoint=none.pt", "inputs=none.png", "topk=0"],
    "visualize": ["checkpoint=none.pt", "image=none.png", "dpi=0"],
    "export": ["checkpoint=none.pt", "opset=3"],
}
HEAVY = ("torch", "torchvision", "timm")


def import_seconds(code: str) -> dict[str, float]:
    """Cumulative import time (s) of each top-level module that ``code`` imports, from ``-X importtime``."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            check=True)
    times = {}
    for line in result.stderr.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if found and len(found.group(2)) <= 1:  # a module imported at the top, not by another
            times[found.group(3)] = int(found.group(1)) / 1e6
    return times


def refusal(entry: str, args: list[str], folder: Path) -> tuple[float, bool, str]:
    """Wall time of ``python -m vitrain.<entry> ARGS`` (exit 1 expected), whether it imported torch, its last line."""
    probe = (f"import runpy, sys; sys.argv = ['vitrain-{entry}', *{args!r}]\n"
             f"try:\n    runpy.run_module('vitrain.{entry}', run_name='__main__')\n"
             f"finally:\n    print('imported:', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=folder)
    elapsed = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    heavy = any(m in lines[-1].split()[1:] for m in HEAVY)
    return elapsed, heavy, lines[-2] if len(lines) > 1 else ""


def wall(command: list[str], folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, cwd=folder)
    return time.perf_counter() - start


def exit_lag(folder: Path) -> tuple[float, float]:
    """A 1-epoch digits run: seconds from its last line to the process's end, and the whole command."""
    command = [sys.executable, "-u", "-m", "vitrain.train", "trainer.epochs=1", "scheduler.warmup_epochs=0",
               "trainer.progress=false", f"hydra.run.dir={folder}/run-{time.time_ns()}"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder)
    last = start
    for _ in proc.stdout:
        last = time.perf_counter()
    proc.wait()
    end = time.perf_counter()
    return end - last, end - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = p.parse_args()
    median = statistics.median
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        libraries = [import_seconds("import torch, torchvision, timm, hydra") for _ in range(args.rounds)]
        figures["libraries"] = {m: median(r.get(m, 0.0) for r in libraries)
                                for m in ("torch", "torchvision", "timm", "hydra")}
        for entry, bad in COMMANDS.items():
            module = f"vitrain.{entry}"
            imports = [import_seconds(f"import {module}")[module] for _ in range(args.rounds)]
            refused = [refusal(entry, bad, folder) for _ in range(args.rounds)]
            helps = [wall([sys.executable, "-m", module, "--help"], folder) for _ in range(args.rounds)]
            figures[entry] = {"import_s": median(imports), "refusal_s": median(r[0] for r in refused),
                              "refusal_imports_torch": any(r[1] for r in refused), "refusal_line": refused[0][2],
                              "help_s": median(helps)}
            row = figures[entry]
            rows.append(f"| `vitrain.{entry}` | {row['import_s']:.2f} s | `{' '.join(bad)}`: {row['refusal_s']:.2f} s "
                        f"| {'yes' if row['refusal_imports_torch'] else 'no'} | {row['help_s']:.2f} s |")
        lags = [exit_lag(folder) for _ in range(args.rounds)]
        figures["exit_lag_s"], figures["run_s"] = median(lag for lag, _ in lags), median(t for _, t in lags)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else \
        platform.machine()
    print(f"\n{cpu}, torch {torch.__version__}, Python {platform.python_version()}; median of {args.rounds} processes")
    libs = figures["libraries"]
    print("imports alone: " + ", ".join(f"{m} {s:.2f} s" for m, s in libs.items()))
    print("| command | import (-X importtime) | a refused value | torch imported by it | --help |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"1-epoch digits run: {figures['run_s']:.1f} s; exit {figures['exit_lag_s']:.2f} s after its last line")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
