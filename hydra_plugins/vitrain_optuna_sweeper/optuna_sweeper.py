"""The sweeper: ask Optuna for ``n_jobs`` trials, launch them as one batch through the configured launcher, tell
Optuna each run's result (a value, or :data:`vitrain.pruning.PRUNED`), until ``n_trials`` have run.

The study lives in ``storage`` (by default a sqlite file in the sweep folder), where optuna-dashboard reads it,
where a later sweep with the same ``storage`` and ``study_name`` continues it, and where each trial reports its
epochs when a pruner is set: the sweeper then appends ``sweep.trial``, ``sweep.storage`` and ``sweep.study`` to
the trial's overrides (see :mod:`vitrain.pruning`). When the trials log to MLflow (``logger=mlflow``), the sweep
is one MLflow run with a nested run per trial (see ``_mlflow_run.py``).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.types import Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from vitrain.errors import first_line
from vitrain.pruning import PRUNED, PRUNER_ATTR, pruner_spec

if TYPE_CHECKING:
    import optuna

    from ._search_space import SearchSpace

log = logging.getLogger(__name__)
DIRECTIONS = ("minimize", "maximize")
CUT_ATTR = "cut"  # a trial's user attribute: a stop signal ended it (a continued sweep runs it again)
RETRIED_ATTR = "vitrain.retried"  # the study's: the cut trials already queued again


class VitrainOptunaSweeper(Sweeper):
    """``hydra/sweeper=vitrain_optuna`` (settings: :class:`~.config.VitrainOptunaSweeperConf`)."""

    def __init__(self, sampler: DictConfig, pruner: DictConfig | str, direction: str | Sequence[str],
                 n_trials: int, n_jobs: int, storage: str | None, study_name: str | None,
                 max_failure_rate: float, params: DictConfig | None, custom_search_space: str | None = None,
                 heartbeat_interval: int = 60) -> None:
        self.directions = [direction] if isinstance(direction, str) else list(direction)
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise ValueError(f"hydra.sweeper.direction must be minimize, maximize or a list of them, got {direction}")
        self.pruner = pruner_spec(OmegaConf.to_container(pruner, resolve=True) if isinstance(pruner, DictConfig)
                                  else pruner)
        self.prunes = self.pruner["_target_"] != "optuna.pruners.NopPruner"
        if self.prunes and len(self.directions) > 1:
            raise ValueError("Optuna prunes single-objective studies only: set hydra/sweeper/pruner=none "
                             "with several directions")
        if n_trials < 1 or n_jobs < 1 or not 0 <= max_failure_rate <= 1 or heartbeat_interval < 0:
            raise ValueError("hydra.sweeper needs n_trials >= 1, n_jobs >= 1, 0 <= max_failure_rate <= 1 and "
                             f"heartbeat_interval >= 0, got {n_trials}, {n_jobs}, {max_failure_rate}, "
                             f"{heartbeat_interval}")
        self.sampler, self.n_trials, self.n_jobs = sampler, n_trials, n_jobs
        self.storage, self.study_name, self.max_failure_rate = storage, study_name, max_failure_rate
        self.params = {} if params is None else {str(k): str(v) for k, v in params.items()}
        self.custom_search_space = custom_search_space
        self.heartbeat_interval = heartbeat_interval
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        """Run ``n_trials`` trials over ``params`` and the command line's sweeps; write optimization_results.yaml."""
        from ._mlflow_run import sweep_run
        from ._search_space import parse_search_space

        if self.prunes and "sweep" not in self.config:  # the trials would be given sweep.trial=... and fail
            print("error: a pruner needs runs that report their epochs to their trial, and this app has no `sweep` "
                  "node (vitrain.train has one: see vitrain.pruning.SweepConfig and TrialReporter); set "
                  "hydra/sweeper/pruner=none", file=sys.stderr)
            sys.exit(1)
        space = parse_search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        study, n_trials = self._study(space)
        search = {"sampler": type(study.sampler).__name__, "pruner": self.pruner, "direction": self.directions,
                  "n_trials": n_trials, **{f"space.{k}": d for k, d in space.distributions.items()}}
        self.mlflow_run = sweep_run(self.config, study, search)  # logger=mlflow: the trials nest under it
        log.info("Optuna study %s in %s: %d trials, %d at a time, sampler %s, pruner %s, %s", study.study_name,
                 self._storage_url(), n_trials, self.n_jobs, search["sampler"], type(study.pruner).__name__,
                 "/".join(self.directions))
        with self.mlflow_run.running(study), Heartbeat(study, self.heartbeat_interval) as self.heartbeat:
            self._optimize(study, space, n_trials)
            write_results(study, Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")

    def _optimize(self, study: optuna.Study, space: SearchSpace, n_trials: int) -> None:
        """Ask for ``n_jobs`` trials, run them as one batch, tell their results; until ``n_trials`` have run. A
        failed trial (refused, raised) is recorded as FAIL with its reason, and the sweep goes on while the failed
        share of this sweep's trials stays within ``max_failure_rate``."""
        ran, failed = 0, []
        while n_trials > 0:
            trials = [self._ask(study, space) for _ in range(min(self.n_jobs, n_trials))]
            self.heartbeat.running(trials)
            batch = [space.overrides(t.params) + self._trial_overrides(study, t) for t in trials]
            returns = self._launch(study, trials, batch)
            told = [tell(study, t, r, len(self.directions)) for t, r in zip(trials, returns, strict=True)]
            self.heartbeat.running([])
            self.mlflow_run.record(study, [t.number for t in trials])
            ran, failed = ran + len(returns), failed + [e for e in told if e is not None]
            if failed and len(failed) / ran > self.max_failure_rate:
                print(f"error: {len(failed)} of {ran} trials failed, more than hydra.sweeper.max_failure_rate="
                      f"{self.max_failure_rate} allows, the last with: {first_line(failed[-1])}; the sweep stops (the "
                      f"failures are in the study, with their reasons)", file=sys.stderr)
                sys.exit(1)
            n_trials -= len(trials)

    def _ask(self, study: optuna.Study, space: SearchSpace, attempts: int = 10) -> optuna.Trial:
        """A trial whose parameters no finished trial had: a proposal that repeats one is recorded with that
        trial's result and state (its ``repeat_of`` attribute names it), not run, and Optuna is asked again (at
        most ``attempts`` times; a small discrete space may have nothing new left). A cut trial queued to run again
        runs again."""
        from optuna.trial import TrialState

        for attempt in range(attempts + 1):
            with warnings.catch_warnings():  # the heartbeat is recorded by Heartbeat, where Study.optimize would
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = study.ask(space.distributions)
            if self.custom_search_space:  # the official plugin's define-by-run hook: more trial.suggest_* calls
                get_method(self.custom_search_space)(self.config, trial)
            if "retry_of" in trial.user_attrs or attempt == attempts:
                return trial
            finished = {_key(t.params): t for t in study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.PRUNED)) if "repeat_of" not in t.user_attrs}  # the runs themselves
            earlier = finished.get(_key(trial.params))
            if earlier is None:
                return trial
            log.info("trial %d repeats trial %d's parameters: recorded with its result, not run", trial.number,
                     earlier.number)
            trial.set_user_attr("repeat_of", earlier.number)
            _tell(study, trial, earlier.state, earlier.values if earlier.state == TrialState.COMPLETE else None)
        raise AssertionError("unreachable")

    def _launch(self, study: optuna.Study, trials: list[optuna.Trial], batch: list[list[str]]) -> Sequence[JobReturn]:
        """Launch a batch of trials; if it cannot be launched (a bad override, a launcher's error), its trials are
        marked failed in the study rather than left running there."""
        from optuna.trial import TrialState

        try:
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        except BaseException as e:  # SystemExit of a trial stopped by a signal: cut, to run again on continuing
            cut = isinstance(e, SystemExit | KeyboardInterrupt)
            for trial in trials:
                trial.set_user_attr("fail_reason", f"stopped by a signal (exit {e.code})" if isinstance(e, SystemExit)
                                    else "interrupted" if cut else first_line(e))
                trial.set_user_attr(CUT_ATTR, cut)
                _tell(study, trial, TrialState.FAIL)
            raise
        self.job_idx += len(returns)
        return returns

    def _storage_url(self) -> str:
        if self.storage is not None:
            return self.storage
        return f"sqlite:///{Path(self.config.hydra.sweep.dir).resolve() / 'optuna.db'}"

    def _study(self, space: SearchSpace) -> tuple[optuna.Study, int]:
        """The study, created or continued, with its sampler and pruner; and the number of trials to run."""
        import optuna

        from vitrain.pruning import build_pruner

        from ._search_space import grid

        n_trials = self.n_trials
        if self.sampler._target_ == "optuna.samplers.MOTPESampler":
            print("error: the motpe sampler was removed in Optuna 4, whose TPE handles several objectives itself: "
                  "use hydra/sweeper/sampler=tpe (or nsgaii)", file=sys.stderr)
            sys.exit(1)
        if self.sampler._target_ == "optuna.samplers.GridSampler":
            values = grid(space.distributions)
            sampler = instantiate(self.sampler, search_space=values)
            n_trials = min(n_trials, math.prod(len(v) for v in values.values()))
        else:
            sampler = instantiate(self.sampler)
        if self.storage is None:
            Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                self._storage_url(), heartbeat_interval=self.heartbeat_interval or None,
                heartbeat_stale_trial_callback=retry_stale if self.heartbeat_interval else None)
        study = optuna.create_study(storage=storage, study_name=self.study_name, sampler=sampler,
                                    pruner=build_pruner(self.pruner), directions=self.directions,
                                    load_if_exists=True)
        if [d.name.lower() for d in study.directions] != self.directions:
            raise ValueError(f"study {study.study_name} is {[d.name.lower() for d in study.directions]}, "
                             f"not {self.directions}: choose another hydra.sweeper.study_name")
        study.set_user_attr(PRUNER_ATTR, self.pruner)  # the runs build the same pruner from it
        if study.trials:  # a continued study
            if self.heartbeat_interval:  # trials of a sweep killed outright (SIGKILL, a lost node): FAIL, run again
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            n_trials = self._continue(study, space, n_trials)
        return study, n_trials

    def _continue(self, study: optuna.Study, space: SearchSpace, n_trials: int) -> int:
        """A continued study proposes nothing it already ran: a seeded sampler is seeded anew from the number of
        trials already in the study (the same seed would propose trials 0, 1, ... again), a grid runs only what it
        has not visited, and the trials a stop signal cut are queued to run first (once)."""
        from optuna.trial import TrialState

        from ._search_space import grid

        done = len(study.trials)
        seed = self.sampler.get("seed")
        if self.sampler._target_ == "optuna.samplers.GridSampler":
            values = grid(space.distributions)
            visited = {tuple(sorted(t.params.items())) for t in study.trials if t.state.is_finished()}
            left = math.prod(len(v) for v in values.values()) - len(visited)
            log.info("continuing grid study %s: %d of its combinations left", study.study_name, max(left, 0))
            return max(0, min(n_trials, left))
        if seed is not None:
            study.sampler = instantiate(self.sampler, seed=int(seed) + done)
            log.info("continuing study %s after %d trials: sampler seed %d + %d", study.study_name, done, seed, done)
        retried = set(study.user_attrs.get(RETRIED_ATTR, []))
        cut = [t for t in study.trials if t.state == TrialState.FAIL and t.user_attrs.get(CUT_ATTR)
               and t.number not in retried]
        for t in cut:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.info("trial %d was cut by a stop signal: it runs again first", t.number)
        study.set_user_attr(RETRIED_ATTR, sorted(retried | {t.number for t in cut}))
        return n_trials

    def _trial_overrides(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        """What a run needs to report to its trial, when a pruner is set (vitrain.pruning.SweepConfig), and to nest
        its MLflow run under the sweep's, when it logs to MLflow (see ``_mlflow_run``)."""
        overrides = self.mlflow_run.trial_overrides(trial)
        if not self.prunes:
            return overrides
        return [f"sweep.trial={trial.number}", f"sweep.storage={Transformer.str(self._storage_url())}",
                f"sweep.study={Transformer.str(study.study_name)}", *overrides]


class Heartbeat:
    """While a sweep runs, a thread records in the storage, every ``interval`` seconds, that its running trials are
    alive. A sweep killed outright (SIGKILL, a lost node) records nothing at the end, so that its trials stay
    RUNNING; a continued sweep finds them stale (no heartbeat for twice the interval), and Optuna marks them FAIL
    and :func:`retry_stale` queues them to run again, as the cut ones."""

    def __init__(self, study: optuna.Study, interval: int) -> None:
        self.study, self.interval, self.ids = study, interval, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="vitrain-sweep-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def running(self, trials: list[optuna.Trial]) -> None:
        """The trials now running (none: ``[]``); a heartbeat is recorded for each at once."""
        self.ids = [t._trial_id for t in trials]
        if self.interval:
            self._record(self.ids)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self._record(self.ids)

    def _record(self, ids: list[int]) -> None:
        for trial_id in ids:
            try:
                self.study._storage.record_heartbeat(trial_id)
            except Exception as e:  # a busy sqlite file: the next beat records it
                log.warning("heartbeat of trial %d not recorded: %s", trial_id, first_line(e))


def retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's callback for a trial it failed as stale (its sweep was killed outright): queue it to run again first,
    as a trial cut by a stop signal is."""
    retried = set(study.user_attrs.get(RETRIED_ATTR, []))
    if trial.number in retried:
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retry_reason": "its sweep was killed"})
    study.set_user_attr(RETRIED_ATTR, sorted(retried | {trial.number}))
    log.info("trial %d was left RUNNING by a sweep killed outright: marked FAIL, it runs again first", trial.number)


def tell(study: optuna.Study, trial: optuna.Trial, result: JobReturn, n_objectives: int) -> Exception | None:
    """Record a run's result as its trial's: COMPLETE with its value(s), PRUNED when it returned
    :data:`~vitrain.pruning.PRUNED`, FAIL when it raised or returned no number; return the failure, if any."""
    from optuna.trial import TrialState

    if result.hydra_cfg is not None:  # the run's folder, beside its trial in the dashboard
        trial.set_user_attr("run_dir", str(result.hydra_cfg.hydra.runtime.output_dir))
    try:
        value = result.return_value  # a run that raised: Hydra raises its exception again here
        if isinstance(value, str) and value == PRUNED:
            log.info("trial %d pruned", trial.number)
            _tell(study, trial, TrialState.PRUNED)
            return None
        values = _values(value, n_objectives)
    except Exception as e:
        reason = first_line(e)
        log.warning("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("fail_reason", reason)
        _tell(study, trial, TrialState.FAIL)
        return e
    log.info("trial %d finished: %s", trial.number, values[0] if n_objectives == 1 else values)
    _tell(study, trial, TrialState.COMPLETE, values)
    return None


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _values(value: Any, n_objectives: int) -> list[float]:
    """A run's return value as the study's objective values."""
    try:
        values = [float(value)] if n_objectives == 1 else [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"the run returned {value!r}, not {n_objectives} number(s)") from e
    if len(values) != n_objectives:
        raise ValueError(f"the run returned {len(values)} values for {n_objectives} objectives")
    return values


def _tell(study: optuna.Study, trial: optuna.Trial, state: Any, values: list[float] | None = None) -> None:
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as e:  # the grid sampler stops the study when its grid is done, outside optimize()
        if "Study.stop" not in str(e):
            raise


def write_results(study: optuna.Study, path: Path) -> None:
    """optimization_results.yaml: the best value and parameters (several objectives: the Pareto front), and the
    study's name, to continue it or find it in optuna-dashboard."""
    results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
    try:
        if len(study.directions) == 1:
            results.update(best_params=study.best_trial.params, best_value=study.best_value)
            log.info("best value %s with %s", study.best_value, study.best_trial.params)
        else:
            results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
            log.info("%d Pareto solutions", len(results["solutions"]))
    except ValueError:  # no trial completed (all failed or pruned)
        log.warning("no trial of study %s completed: no best value", study.study_name)
    OmegaConf.save(OmegaConf.create(results), path)
