"""Loader workers and a scheduler's stop signals (vitrain/runtime.py): a SIGTERM to the whole process group that
arrives while workers start, before their ``worker_init_fn`` has run, used to kill them (PyTorch's worker SIGTERM
handler ends a worker on any SIGTERM not from its parent) and the run ended in ``DataLoader worker exited
unexpectedly``; started with the stop signals blocked, they survive it and the main process gets it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, signal, subprocess, sys, time
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from vitrain import runtime
    from vitrain.guards import StopSignals

    masked = sys.argv[1] == "masked"
    assert os.getpgid(0) == os.getpid()  # its own process group (the test starts a new session)
    init = runtime.ignore_stop_signals

    def slow_init(worker_id):  # widens the start-up window in which the signal arrives
        time.sleep(1.0)
        init(worker_id)

    class Numbers(IterableDataset):
        def __iter__(self):
            yield from (torch.tensor(i) for i in range(4))

    options = runtime.loader_workers(2) if masked else {}
    options["worker_init_fn"] = slow_init
    stop, result = StopSignals(), {}
    with stop.catch():
        try:
            batches = iter(DataLoader(Numbers(), batch_size=None, num_workers=2, **options))  # workers start
            time.sleep(0.3)  # another process (the scheduler) signals the whole group while they start
            subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpid()}, signal.SIGTERM)"])
            result["batches"] = sorted(int(x) for x in batches)
        except RuntimeError as e:
            result["error"] = str(e)
    result["signal"] = stop.signum
    print(json.dumps(result))
''')


def run_script(mode: str, tmp_path) -> dict:
    path = tmp_path / "workers.py"
    path.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(path), mode], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_that_start_with_the_signals_blocked_survive_a_group_sigterm(tmp_path) -> None:
    result = run_script("masked", tmp_path)
    assert result == {"batches": [0, 0, 1, 1, 2, 2, 3, 3], "signal": 15}


@pytest.mark.slow
def test_without_the_mask_the_same_signal_kills_a_starting_worker(tmp_path) -> None:
    """The control: the failure the mask prevents, in the same script."""
    result = run_script("plain", tmp_path)
    assert "exited unexpectedly" in result.get("error", ""), result


def test_a_run_stops_its_loader_workers_when_it_ends(tmp_path) -> None:
    """Persistent loader workers are stopped when train() returns, not at garbage collection: collected from inside
    a reference cycle, an iterator's workers never heard the stop and were killed after 5 s each (20 s per run of
    2 train + 2 val workers, paid by whatever the process did next)."""
    import gc
    import multiprocessing
    import time

    from formats import write_id_folder

    from vitrain.config import compose
    from vitrain.train import train

    ids = write_id_folder(tmp_path / "ids", train=4, val=2)
    train(compose(["data=imagefolder", f"data.root={ids}", "data.num_workers=2", "data.batch_size=4",
                   "trainer.epochs=1", "scheduler.warmup_epochs=0", "trainer.progress=false", "logger=[]"]),
          tmp_path / "run")
    assert multiprocessing.active_children() == []
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 2.0
