"""A sweep as one MLflow run with a nested run per trial, when the trials log to MLflow (``logger=mlflow``).

The sweeper creates the sweep's run (named after the sweep folder, tagged with the study) in the store that the
trials log to: ``logger.mlflow.tracking_uri``, or, when that is null, one sqlite file for the whole sweep,
``<sweep dir>/mlflow.db`` (a run alone keeps its own in its folder). Each trial gets that store, the sweep's run
as ``logger.mlflow.parent_run_id`` (MLflow's ``mlflow.parentRunId`` tag nests it) and its trial number and study
as ``logger.mlflow.tags``; its own params are its whole config, the searched values among them. The sweep's run
holds the search (sampler, pruner, space) as params, each trial's value and the best so far as metrics by trial
number, and at the end the best parameters and the number of trials in each state.

Imported only when a sweep starts; MLflow only when its trials log to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.types import Transformer
from omegaconf import DictConfig, OmegaConf

from vitrain.errors import VitrainError, first_line
from vitrain.loggers import require, run_name
from vitrain.mlflow_logger import mlflow_experiment_id, probe_server

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


class NoSweepRun:
    """The trials do not log to MLflow: nothing to group them under."""

    def trial_overrides(self, trial: optuna.Trial) -> list[str]:
        """What a trial's run needs to nest under the sweep's run: nothing here."""
        return []

    def record(self, study: optuna.Study, numbers: list[int]) -> None:
        """The trials ``numbers`` were told to the study."""

    @contextlib.contextmanager
    def running(self, study: optuna.Study) -> Iterator[None]:
        """The sweep's trials run inside; then the sweep's run ends, finished or failed."""
        yield


class MLflowSweepRun(NoSweepRun):
    """The sweep's MLflow run, the parent of its trials' runs."""

    def __init__(self, cfg: DictConfig, sweep_dir: Path, study: optuna.Study, search: dict[str, Any]) -> None:
        mlflow_tracking = require("mlflow.tracking", "mlflow")
        self.given_uri = cfg.tracking_uri  # the trials already have it; null: the sweep's sqlite file, for them all
        self.uri = self.given_uri or f"sqlite:///{sweep_dir.resolve() / 'mlflow.db'}"
        if self.uri.startswith(("http://", "https://")):
            probe_server(self.uri)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.tags = {**OmegaConf.to_container(cfg.tags), "optuna.study": study.study_name}
        self.failed = False
        try:
            self.client = mlflow_tracking.MlflowClient(self.uri)
            experiment = mlflow_experiment_id(self.client, cfg.experiment, self.uri)
            self.run_id = self.client.create_run(experiment, run_name=run_name(sweep_dir), tags=self.tags).info.run_id
        except Exception as e:  # a store that cannot be opened, an unknown scheme
            raise VitrainError(f"cannot open the MLflow tracking store {self.uri}: {first_line(e)}; fix "
                               f"logger.mlflow.tracking_uri (no trial was run)") from e
        self._log(params={k: str(v)[:6000] for k, v in search.items()})
        log.info("MLflow: the sweep is run %s in %s, its trials nested under it", self.run_id, self.uri)

    def trial_overrides(self, trial: optuna.Trial) -> list[str]:
        tags = {"optuna.study": self.tags["optuna.study"], "optuna.trial": trial.number}  # ++: merged into the run's
        overrides = [f"logger.mlflow.parent_run_id='{self.run_id}'", f"++logger.mlflow.tags={Transformer.str(tags)}"]
        if self.given_uri is None:
            overrides.insert(0, f"logger.mlflow.tracking_uri={Transformer.str(self.uri)}")
        return overrides

    def record(self, study: optuna.Study, numbers: list[int]) -> None:
        """Each told trial's value (a pruned one's: its last reported), and the best so far, at its number."""
        metrics = {}
        for number in numbers:
            values = study.trials[number].values or []
            for i, value in enumerate(values):
                metrics[f"trial_value_{i}" if len(values) > 1 else "trial_value", number] = value
            if len(study.directions) == 1 and values:
                with contextlib.suppress(ValueError):  # no trial complete yet
                    metrics["best_value", number] = study.best_value
        self._log(metrics=metrics)

    @contextlib.contextmanager
    def running(self, study: optuna.Study) -> Iterator[None]:
        from optuna.trial import TrialState

        try:
            yield
        except BaseException:
            self._call("set_terminated", status="FAILED")
            raise
        counts = {f"trials_{s.name.lower()}": len(study.get_trials(states=(s,))) for s in
                  (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        best = {}
        if len(study.directions) == 1 and counts["trials_complete"]:
            best = {f"best.{k}": str(v) for k, v in study.best_params.items()}
        self._log(metrics={(k, 0): v for k, v in counts.items()}, params=best)
        self._call("set_terminated", status="FINISHED")

    def _log(self, metrics: dict[tuple[str, int], float] | None = None, params: dict[str, str] | None = None) -> None:
        """One batch of metrics (by name and step) and params; after a failure, a warning and no more MLflow calls:
        the sweep goes on."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        scalars = [Metric(name, float(v), now, step) for (name, step), v in (metrics or {}).items()]
        texts = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, max(len(scalars), len(texts)), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", metrics=scalars[i:i + 100], params=texts[i:i + 100])

    def _call(self, method: str, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.client, method)(self.run_id, **kwargs)
        except Exception as e:  # the server went away: the trials go on, and log on their own
            self.failed = True
            log.warning("MLflow logging of the sweep's run stopped (%s); the sweep goes on", first_line(e))


def sweep_run(config: DictConfig, study: optuna.Study, search: dict[str, Any]) -> NoSweepRun:
    """The sweep's MLflow run when its trials log to MLflow (``logger.mlflow.enabled``), else :class:`NoSweepRun`.
    Any task's config may come here: one without a ``logger`` node has no MLflow run."""
    cfg = OmegaConf.select(config, "logger.mlflow")
    if cfg is None or not cfg.get("enabled", False):
        return NoSweepRun()
    return MLflowSweepRun(cfg, Path(config.hydra.sweep.dir), study, search)
