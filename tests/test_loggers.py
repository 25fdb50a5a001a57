"""Tracking (vitrain/loggers.py, vitrain/tracking.py): what a run logs to TensorBoard, MLflow and W&B, read back
from the real event files, tracking server and offline run; the one-line errors of bad logger input."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from vitrain.checkpoint import load_checkpoint
from vitrain.config import compose, to_config
from vitrain.errors import ConfigError
from vitrain.losses import ClassificationLoss
from vitrain.metrics import LossWindow, gradient_norm
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler
from vitrain.tracking import format_duration
from vitrain.train import train
from vitrain.trainer import Loaders, Trainer, TrainerConfig

SMOKE = ["trainer.epochs=1", "data.batch_size=720", "trainer.progress=false", "trainer.log_every=1"]  # 2 steps


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                                "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """Two steps on the digits with the default logger (TensorBoard), every step logged: the run folder, its
    metrics and the Trainer's log lines."""
    run_dir = tmp_path_factory.mktemp("tb_run")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("vitrain.trainer").addHandler(handler)
    logging.getLogger("vitrain.trainer").setLevel(logging.INFO)
    try:
        metrics = train(compose(SMOKE), run_dir)
    finally:
        logging.getLogger("vitrain.trainer").removeHandler(handler)
    return run_dir, metrics, lines


def test_hparams_row_is_in_the_runs_own_event_file(tb_run: tuple[Path, dict, list[str]]) -> None:
    """The HParams plugin's three summaries sit in <run>/tb itself (one run, one row of a sweep's table): the
    flattened config as hyperparameters, the final metrics as the scalars they name."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir, metrics, _ = tb_run
    assert [p.name for p in (run_dir / "tb").iterdir() if p.is_dir()] == []  # no add_hparams subfolder
    acc = events(run_dir / "tb")
    content = acc.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    hparams = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["model.name"].string_value == "vit_nano_patch4_16"
    assert hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert hparams["data.batch_size"].number_value == 720
    assert hparams["trainer.ema"].string_value == "false"
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"final/val_top1", "final/best_val_top1",
                                                             "final/val_loss"}  # no test split: no test_top1
    assert acc.Scalars("final/val_top1")[-1].value == pytest.approx(metrics["val_top1"])
    assert acc.Scalars("final/best_val_top1")[-1].value == pytest.approx(metrics["best_top1"])


def test_runs_of_a_sweep_are_rows_of_one_hparams_table(tmp_path: Path) -> None:
    """Two runs of a sweep (<sweep>/0/tb, <sweep>/1/tb), read by TensorBoard's own HParams backend: two session
    groups, each with its learning rate and its final metric."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    from vitrain.loggers import TensorBoardLogger

    for run, (lr, top1) in {"0": (1e-3, 60.0), "1": (5e-4, 55.0)}.items():
        logger = TensorBoardLogger(tmp_path / run / "tb")
        logger.log_hparams({"optimizer.lr": lr, "model.name": "vit", "trainer.ema": False}, {"final/val_top1": top1},
                           step=2)
        logger.close()
    runs = plugin_event_multiplexer.EventMultiplexer()
    runs.AddRunsFromDirectory(str(tmp_path))
    runs.Reload()
    tb = type("TBContext", (), {"data_provider": data_provider.MultiplexerDataProvider(runs, str(tmp_path)),
                                "multiplexer": runs, "logdir": str(tmp_path)})()
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.STATUS_SUCCESS], start_index=0, slice_size=10,
        col_params=[api_pb2.ColParams(hparam="optimizer.lr"),
                    api_pb2.ColParams(metric=api_pb2.MetricName(tag="final/val_top1"))])
    table = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    rows = {g.name: (g.hparams["optimizer.lr"].number_value, g.metric_values[0].value) for g in table.session_groups}
    assert rows == {"0/tb": (1e-3, 60.0), "1/tb": (5e-4, 55.0)}


def test_config_text_grad_norm_train_top1_and_image_grid(tb_run: tuple[Path, dict, list[str]]) -> None:
    run_dir, _, lines = tb_run
    acc = events(run_dir / "tb")
    assert "config.yaml/text_summary" in acc.PluginTagToContent("text")
    text = acc.Tensors("config.yaml/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: vit_nano_patch4_16" in text and "batch_size: 720" in text
    norms = acc.Scalars("train/grad_norm")
    assert [s.step for s in norms] == [1, 2]
    assert all(0.0 < s.value < 100.0 for s in norms)  # before clipping to 1.0, a fresh ViT's gradients: O(1)
    top1 = acc.Scalars("train/top1")
    assert [s.step for s in top1] == [1, 2] and all(0.0 <= s.value <= 100.0 for s in top1)
    (grid,) = acc.Images("train/batch")
    assert grid.step == 0 and grid.width >= 4 * 64  # 16 digits of 16 pixels, enlarged to 64, 4 a row
    assert acc.Tags()["histograms"] == []  # off by default
    epoch_lines = [line for line in lines if line.startswith("epoch 1/1")]
    assert len(epoch_lines) == 1 and epoch_lines[0].endswith("eta 0s")


def _tiny_trainer(tmp_path: Path, **config: object) -> Trainer:
    """The Trainer without Hydra on 64 digits (4 batches of 16 a epoch): its default logger, TensorBoard."""
    from vitrain.data.datasets import load_digits

    torch.manual_seed(0)
    train_set, _, _ = load_digits()
    x = torch.nn.functional.interpolate(train_set.images[:64].float() / 127.5 - 1, size=16)
    loader = DataLoader(TensorDataset(x, train_set.labels[:64]), batch_size=16)
    model = create_model("vit_nano_patch4_16", num_classes=10)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=4 * config["epochs"], name="constant")
    return Trainer(model, optimizer, scheduler, ClassificationLoss(), Loaders(loader, loader),
                   TrainerConfig(progress=False, **config), tmp_path)


def test_histograms_only_with_the_switch(tmp_path: Path) -> None:
    """trainer.histograms_every=2 over 3 epochs of 4 steps: weights and gradients at the first step and at the
    first step after 2 epochs; without the switch, none. No grad clip: the norm is measured on logged steps."""
    trainer = _tiny_trainer(tmp_path / "on", epochs=3, histograms_every=2, grad_clip=None, log_every=2)
    trainer.fit()
    acc = events(tmp_path / "on" / "tb")
    assert [h.step for h in acc.Histograms("weights/head.weight")] == [1, 9]
    assert [h.step for h in acc.Histograms("grads/blocks.0.attn.qkv.weight")] == [1, 9]
    grads = acc.Histograms("grads/head.weight")[0].histogram_value
    assert grads.num == trainer.model.head.weight.numel() and grads.min < 0 < grads.max
    assert [s.step for s in acc.Scalars("train/grad_norm")] == [2, 4, 6, 8, 10, 12]
    _tiny_trainer(tmp_path / "off", epochs=1).fit()
    assert events(tmp_path / "off" / "tb").Tags()["histograms"] == []


def test_train_top1_counts_hard_labels_only() -> None:
    """3 of 4 right, then a DeiT pair (its two heads averaged): 5 of 6; soft targets (mixup) are not counted."""
    window = LossWindow(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    window.add(torch.tensor(1.0), logits, torch.tensor([0, 1, 0, 0]))
    window.add(torch.tensor(3.0), (torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])),
               torch.tensor([0, 1]))
    window.add(torch.tensor(2.0), logits, torch.full((4, 2), 0.5))
    loss, top1 = window.pop()
    assert loss == pytest.approx(2.0) and top1 == pytest.approx(100 * 5 / 6)
    window.add(torch.tensor(1.0), logits, torch.full((4, 2), 0.5))
    assert window.pop() == (pytest.approx(1.0), None)


def test_gradient_norm_is_clip_grad_norms() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model(torch.randn(8, 5)).pow(2).sum().backward()
    measured = gradient_norm(model.parameters())
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    torch.testing.assert_close(measured, expected)
    torch.testing.assert_close(measured, torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3))


def test_eta_format() -> None:
    assert [format_duration(s) for s in (0.4, 45, 192, 3600 + 5 * 60 + 7, 26 * 3600)] == [
        "0s", "45s", "3m12s", "1h05m", "26h00m"]


def test_logger_group_selects_backends() -> None:
    def backends(*overrides: str) -> list[str]:
        return to_config(compose(list(overrides))).logger.backends

    assert backends() == ["tensorboard"]
    assert backends("logger=mlflow") == ["mlflow"]
    assert backends("logger=[tensorboard,mlflow,wandb]") == ["tensorboard", "mlflow", "wandb"]
    assert backends("logger=[]") == []
    with pytest.raises(ConfigError, match=r"logger.mlflow.tracking_uri is set but mlflow is not a chosen logger"):
        backends("logger.mlflow.tracking_uri=http://127.0.0.1:5000")


@pytest.mark.parametrize("module", ["mlflow.tracking", "wandb"])
def test_missing_package_is_named(module: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vitrain.build import build_logger
    from vitrain.distributed import World

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    name = module.split(".")[0]
    cfg = to_config(compose([f"logger={name}"])).logger
    with pytest.raises(ConfigError) as error:
        build_logger(cfg, tmp_path, World())
    assert str(error.value) == f'logger={name} needs the {name} package: pip install "vitrain[{name}]"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free local port (sqlite store, proxied artifacts), stopped afterwards."""
    pytest.importorskip("mlflow")
    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    with open(root / "server.log", "w") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts")], stdout=subprocess.DEVNULL, stderr=server_log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.3)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        server.wait(timeout=30)


def _read_mlflow_run(uri: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vitrain")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_mlflow_server_gets_params_metrics_and_artifacts(mlflow_server: str, tmp_path: Path) -> None:
    metrics = train(compose([*SMOKE, "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={mlflow_server}"]),
                    tmp_path / "run")
    client, run = _read_mlflow_run(mlflow_server)
    assert run.info.status == "FINISHED" and run.info.run_name.endswith("/run")
    assert run.data.params["model.name"] == "vit_nano_patch4_16" and run.data.params["data.batch_size"] == "720"
    assert run.data.params["data.mean"] == str(load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
                                               ["preprocess"]["mean"])  # a list, as its text
    assert [(m.step, round(m.value, 4)) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (s.step, round(s.value, 4)) for s in events(tmp_path / "run" / "tb").Scalars("train/loss")]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/grad_norm")] == [1, 2]
    assert run.data.metrics["final/val_top1"] == pytest.approx(metrics["val_top1"])
    assert run.data.metrics["val/top1"] == pytest.approx(metrics["final_top1"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [  # epochs, from 1
        r["epoch"] for r in metrics["history"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "checkpoints", "train"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    saved = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(saved).read_text())["steps"] == 2


def test_mlflow_default_store_is_in_the_run_folder_and_changes_no_result(
        tmp_path: Path, tb_run: tuple[Path, dict, list[str]]) -> None:
    """logger=mlflow alone: sqlite in <run>/mlflow.db, artifacts in <run>/mlartifacts, no TensorBoard; the same
    batches and numbers as the TensorBoard run (MLflow draws nothing from the seeded generators); resumed, the
    same MLflow run continues."""
    pytest.importorskip("mlflow")
    metrics = train(compose([*SMOKE, "logger=mlflow"]), tmp_path)
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "tb").exists()
    client, run = _read_mlflow_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert run.data.params["model.name"] == "vit_nano_patch4_16"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert (Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / "best.pt").is_file()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["logger"]["mlflow_run_id"] == run.info.run_id
    keys = ("train_loss", "val_loss", "val_top1")
    assert [[r[k] for k in keys] for r in metrics["history"]] == [[r[k] for k in keys] for r in tb_run[1]["history"]]

    train(compose([*SMOKE, "logger=mlflow", "trainer.epochs=2", "trainer.resume=auto"]), tmp_path)
    client, resumed = _read_mlflow_run(f"sqlite:///{tmp_path / 'mlflow.db'}")  # still one run: the same
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


def test_mlflow_run_nests_under_a_parent_with_its_tags(tmp_path: Path) -> None:
    """logger.mlflow.parent_run_id and logger.mlflow.tags (what an Optuna sweep gives its trials): MLflow's
    mlflow.parentRunId tag and the run's own tags."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from vitrain.mlflow_logger import MLflowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("vitrain")).info.run_id
    cfg = to_config(compose(["logger=mlflow", f"logger.mlflow.tracking_uri={uri}",
                             f"logger.mlflow.parent_run_id='{parent}'", "+logger.mlflow.tags.team=vision"])).logger
    logger = MLflowLogger(cfg.mlflow, tmp_path / "run")
    logger.start({"optimizer": {"lr": 1e-3}})
    logger.close()
    child = client.get_run(logger.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.tags["team"] == "vision"
    assert child.data.params["optimizer.lr"] == "0.001" and child.info.status == "FINISHED"
    assert child.data.tags["vitrain.state"] == "complete"
    pruned = MLflowLogger(cfg.mlflow, tmp_path / "pruned")  # a trial stopped by the sweep's pruner
    pruned.start({})
    pruned.close("pruned")
    run = client.get_run(pruned.run_id)
    assert run.info.status == "KILLED" and run.data.tags["vitrain.state"] == "pruned"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitrain.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_unreachable_tracking_server_stops_before_training_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli([*SMOKE, "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}",
                      f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: cannot reach the MLflow tracking server at {uri} ("), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@contextlib.contextmanager
def web_server(answer: Callable[[http.server.BaseHTTPRequestHandler], tuple[int, str, bytes]]) -> Iterator[str]:
    """A plain HTTP server on a free local port, in a thread, whose ``answer(request)`` gives (status, content type,
    body) for every GET; yields its URI."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status, kind, body = answer(self)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


def _any_page(request: http.server.BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
    return 200, "text/html", b"<html><body>OK</body></html>"  # /health too: the probe before answered to it


def _no_api(request: http.server.BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
    return (200, "text/plain", b"OK") if request.path == "/health" else (404, "text/html", b"not found")


def test_a_web_server_that_is_not_mlflow_is_refused(tmp_path: Path) -> None:
    from vitrain.errors import VitrainError
    from vitrain.mlflow_logger import probe_server

    for answer, what in ((_no_api, "HTTP 404"), (_any_page, "a text/html page, not MLflow's JSON")):
        with web_server(answer) as uri, pytest.raises(VitrainError) as error:
            probe_server(uri)
        assert str(error.value) == (f"the server at {uri} is not an MLflow tracking server (GET "
                                    f"/api/2.0/mlflow/experiments/search gave {what}); start `mlflow server` there or "
                                    f"fix logger.mlflow.tracking_uri (nothing was trained)")


def test_a_web_server_that_is_not_mlflow_stops_the_run_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    with web_server(_any_page) as uri:
        result = run_cli([*SMOKE, "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}",
                          f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: the server at {uri} is not an MLflow tracking server"), \
        result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_the_probe_accepts_mlflows_answer_with_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that answers the REST call with JSON passes; behind basic authentication, with MLflow's own
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, and a one-line error naming them without."""
    import base64

    from vitrain.errors import VitrainError
    from vitrain.mlflow_logger import probe_server

    seen = []

    def mlflow_with_login(request: http.server.BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        seen.append(request.path)
        if request.headers.get("Authorization") != "Basic " + base64.b64encode(b"ada:secret").decode():
            return 401, "text/plain", b"You are not authenticated."
        return 200, "application/json", json.dumps({"experiments": [{"experiment_id": "0"}]}).encode()

    with web_server(mlflow_with_login) as uri:
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ada")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
        probe_server(uri + "/")
        assert seen == ["/api/2.0/mlflow/experiments/search?max_results=1"]
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(VitrainError, match=rf"^the server at {uri} refused MLflow's REST call \(HTTP 401\); for "
                                               r"an MLflow server with authentication set MLFLOW_TRACKING_TOKEN"):
            probe_server(uri)


def test_unknown_logger_is_one_line_listing_the_options(tmp_path: Path) -> None:
    result = run_cli(["logger=[tensorboard,mlfow]", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: unknown logger 'mlfow'; choose from mlflow, tensorboard, wandb, or "
                                     "several at once: logger=[mlflow,tensorboard]")


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file: W&B's LevelDB-style log (a 7-byte file header, then in
    32 KiB blocks chunks with a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST), each record a protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(Record.FromString(pending))
            pending = b""
    return records


def wandb_run(folder: Path) -> dict:
    """An offline run's config, history rows and summary, read from its .wandb file."""
    (path,) = folder.glob("run-*.wandb")
    run: dict = {"config": {}, "history": [], "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"] |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "summary":
            run["summary"] |= {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                               for item in record.summary.update}
    return run


def test_wandb_offline_run_and_its_resume_keep_the_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WANDB_MODE=offline, no network: the offline run has the config, every logged step and the final metrics;
    `trainer.resume=auto` continues the same W&B run (the id is in last.pt)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = [*SMOKE[1:], "logger=wandb", "trainer.histograms_every=1"]
    train(compose(["trainer.epochs=1", *run]), tmp_path)
    run_id = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["logger"]["wandb_run_id"]
    (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    logged = wandb_run(first)
    assert logged["id"] == run_id and logged["config"]["model"]["name"] == "vit_nano_patch4_16"
    steps = {row["_step"]: row for row in logged["history"]}
    assert {1, 2} <= set(steps) and "train/loss" in steps[2] and "train/grad_norm" in steps[2]
    assert steps[0]["train/batch/_type"] == "image-file" and steps[1]["grads/head.weight/_type"] == "histogram"
    assert 0.0 <= logged["summary"]["final/val_top1"] <= 100.0

    metrics = train(compose(["trainer.epochs=2", "trainer.resume=auto", *run]), tmp_path)
    assert metrics["steps"] == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["logger"]["wandb_run_id"] == run_id
    second = [f for f in (tmp_path / "wandb").glob(f"offline-run-*-{run_id}") if f != first]
    assert len(second) == 1 and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    resumed = wandb_run(second[0])
    assert resumed["id"] == run_id
    assert max(row["_step"] for row in resumed["history"]) == 4
