"""Many command lines of one entry point in one Python process: the bad-input tables run each case through the real
``main()`` (Hydra's app, the one-line error handler, the exit code) without paying an interpreter start and the
imports per case.

``python tests/cli_batch.py MODULE CASES.json`` reads a list of argument lists and prints a JSON list of
``{"code": exit code, "stderr": what the case wrote to stderr}``; an exception that escapes ``main()`` is reported
with its traceback, as a user would see it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
import traceback
from pathlib import Path


def run_cases(module: str, cases: list[list[str]], cwd: Path) -> list[dict]:
    """Run ``python -m MODULE *args`` for each of ``cases`` in one child process; their exit codes and stderr."""
    spec = cwd / "cli_cases.json"
    spec.write_text(json.dumps(cases))
    result = subprocess.run([sys.executable, __file__, module, str(spec)], capture_output=True, text=True,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run(main, args: list[str]) -> dict:
    sys.argv = ["vitrain", *args]
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    return {"code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    entry = importlib.import_module(sys.argv[1]).main
    results = [_run(entry, args) for args in json.loads(Path(sys.argv[2]).read_text())]
    sys.stdout = sys.__stdout__
    print(json.dumps(results))
