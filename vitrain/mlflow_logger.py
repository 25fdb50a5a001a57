"""MLflow tracking (``logger=mlflow``): the tracking server's probe and the logger that writes a run to it.

:class:`MLflowLogger` logs the flattened config as params, metrics per step and the run's files as artifacts, in a
sqlite store in the run folder or at ``logger.mlflow.tracking_uri``; its run id goes into ``last.pt``, so that a
resumed run continues it, and a sweep's trials nest under the sweep's parent run. :func:`probe_server` asks a
tracking server something only MLflow answers, before any data is read.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from vitrain.errors import VitrainError, first_line
from vitrain.loggers import PARENT_RUN_TAG, Logger, MLflowConfig, flatten, require, run_name

log = logging.getLogger(__name__)

MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # a REST call that only MLflow answers


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """A one-line error unless ``uri`` is an MLflow tracking server that answers within ``timeout`` seconds. It must
    answer MLflow's REST call ``GET`` :data:`MLFLOW_PROBE` with a JSON object: any web server has a ``/health``
    page, only MLflow this. The credentials MLflow's client sends (``MLFLOW_TRACKING_TOKEN``, or
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``) go with the request."""
    request = urllib.request.Request(uri.rstrip("/") + MLFLOW_PROBE, headers=_mlflow_credentials())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, kind = response.read(1 << 20), response.headers.get_content_type()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise VitrainError(f"the server at {uri} refused MLflow's REST call (HTTP {e.code}); for an MLflow server "
                               f"with authentication set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
                               f"MLFLOW_TRACKING_PASSWORD, else fix logger.mlflow.tracking_uri (nothing was trained)"
                               ) from e
        raise VitrainError(_not_mlflow(uri, f"HTTP {e.code}")) from e
    except (OSError, ValueError) as e:  # URLError, refused, timed out, a malformed address
        reason = getattr(e, "reason", None) or first_line(e)
        raise VitrainError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it or fix "
                           f"logger.mlflow.tracking_uri (nothing was trained)") from e
    try:
        answer = json.loads(body)
    except ValueError:  # HTML, text, bytes
        answer = None
    if not isinstance(answer, dict):
        raise VitrainError(_not_mlflow(uri, f"a {kind} page, not MLflow's JSON"))


def _not_mlflow(uri: str, answer: str) -> str:
    return (f"the server at {uri} is not an MLflow tracking server (GET {MLFLOW_PROBE.split('?')[0]} gave {answer}); "
            f"start `mlflow server` there or fix logger.mlflow.tracking_uri (nothing was trained)")


def _mlflow_credentials() -> dict[str, str]:
    """The Authorization header that MLflow's client would send, from its environment variables (none: {})."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        return {"Authorization": f"Bearer {token}"}
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def mlflow_experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of the experiment ``name`` in the store of ``client`` (at ``uri``), created when missing; a sqlite
    store keeps its artifacts beside its database file, not in ./mlruns of the working folder."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None  # a server's, or the store's own default
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


class MLflowLogger(Logger):
    """An MLflow run through the client: the flattened config as params, the metrics at their steps, the config
    YAML, the image grid, ``metrics.json`` and ``best.pt`` as artifacts. The store is a sqlite file in the run
    folder unless ``tracking_uri`` names one; a server is probed here, before any data is read. A server that
    fails later stops MLflow's logging with a warning, not the training. With ``parent_run_id`` the run is nested
    under that run (an Optuna sweep's trials under the sweep's run, in the sweep's store)."""

    def __init__(self, cfg: MLflowConfig, run_dir: Path) -> None:
        mlflow_tracking = require("mlflow.tracking", "mlflow")
        self.cfg, self.run_dir, self.run_id, self.failed = cfg, Path(run_dir), None, False
        self.uri = cfg.tracking_uri or f"sqlite:///{self.run_dir.resolve() / 'mlflow.db'}"
        if self.uri.startswith(("http://", "https://")):
            probe_server(self.uri)
        if cfg.tracking_uri is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.client = mlflow_tracking.MlflowClient(self.uri)
            self.experiment_id = mlflow_experiment_id(self.client, self.cfg.experiment, self.uri)
        except Exception as e:  # a store that cannot be opened, an unknown scheme
            raise VitrainError(f"cannot open the MLflow tracking store {self.uri}: {first_line(e)}; "
                               f"fix logger.mlflow.tracking_uri (nothing was trained)") from e

    def start(self, config: dict[str, Any]) -> None:
        if self.run_id is not None and self._continues():  # resumed: the same run, its params already logged
            return
        from mlflow.entities import Param

        name = self.cfg.run_name or run_name(self.run_dir)  # given, MLflow draws no random name (no RNG use)
        tags = dict(self.cfg.tags)
        if self.cfg.parent_run_id is not None:
            tags[PARENT_RUN_TAG] = self.cfg.parent_run_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", params=params[i:i + 100])

    def _continues(self) -> bool:
        """Continue the checkpoint's MLflow run, if this store has it."""
        try:
            self.client.update_run(self.run_id, status="RUNNING")
            return True
        except Exception as e:
            log.warning("the checkpoint's MLflow run %s is not in %s (%s); a new MLflow run starts", self.run_id,
                        self.uri, first_line(e))
            self.run_id = None
            return False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """``client.method(run_id, ...)``; after a failure, a warning and no more MLflow calls."""
        if self.run_id is None or self.failed:
            return
        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as e:  # the server went away mid-run: the training goes on
            self.failed = True
            log.warning("MLflow logging stopped (%s); training goes on, the other loggers still log", first_line(e))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_epoch(self, scalars: dict[str, float], step: int, epoch: int) -> None:
        self.log_scalars(scalars, epoch)  # per-epoch metrics at epoch steps; per-step ones keep optimizer steps

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._call("log_text", text, tag)

    def log_images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self._call("log_image", pixels, artifact_file=f"{tag}.png")

    def log_hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.log_scalars(metrics, step)  # the params went in when the run started

    def log_artifact(self, path: Path, checkpoint: bool = False) -> None:
        if checkpoint and not self.cfg.log_checkpoint:
            return
        self._call("log_artifact", str(path), "checkpoints" if checkpoint else None)

    def state_dict(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("mlflow_run_id") or self.run_id

    def close(self, status: str = "finished") -> None:
        """A pruned trial is tagged ``vitrain.state=pruned`` and ends KILLED (MLflow has no pruned status)."""
        self._call("set_tag", "vitrain.state", "complete" if status == "finished" else status)
        self._call("set_terminated", "KILLED" if status == "pruned" else status.upper())
