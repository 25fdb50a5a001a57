"""Shards on a server (vitrain/data/remote.py, vitrain/data/shard_index.py): ``http://``, ``pipe:curl`` and ``s3://``
specs train with two loader workers from real servers that the tests start on 127.0.0.1 (Python's http.server,
moto's S3 server) and stop; a server that goes away is retried, then named in one line that keeps last.pt."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from formats import make_shards, write_id_folder

from vitrain.config import compose
from vitrain.data.remote import scheme, shard_name, sibling
from vitrain.errors import ConfigError
from vitrain.train import train

TRAIN = "train-{000000..000003}.tar"  # shards of 5, 5, 5 and 3 images (18 train images), 1 of 3 validation images
ARGS = ["trainer.progress=false", "data.hflip=false", "data.crop_padding=0", "data.batch_size=4",
        "data.num_workers=2", "trainer.epochs=2", "scheduler.warmup_epochs=0", "logger=[]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class HttpServer:
    """``python -m http.server`` over ``folder`` on 127.0.0.1; its request log (stderr) is kept in a file."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.folder, self.log, self.port, self.proc = folder, log, free_port(), None

    def start(self) -> HttpServer:
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(self.folder)], stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("a"))
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, prefix: str = "train-") -> list[str]:
        """The files fetched, in order, from the server's log lines ("GET /train-000001.tar HTTP/1.1" 200)."""
        return re.findall(rf'"GET /({prefix}[^ ]+) HTTP', self.log.read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    make_shards(write_id_folder(root / "ids", train=6, val=1), root / "shards", per_shard=5)
    return root / "shards"


@pytest.fixture
def server(shards: Path, tmp_path: Path) -> Iterator[HttpServer]:
    served = HttpServer(shards, tmp_path / "http.log").start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def local_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same training from the local shards: the figures every remote run must give."""
    return train(compose(["data=webdataset", f"data.shards='{shards}/{TRAIN}'",
                          f"data.val_shards='{shards}/val-000000.tar'", *ARGS]), tmp_path_factory.mktemp("local"))


def figures(metrics: dict) -> list[tuple]:
    return [(r["epoch"], r["train_loss"], r["val_loss"], r["val_top1"]) for r in metrics["history"]]


def test_schemes_and_siblings() -> None:
    assert sibling("http://h:1/a/train-000001.tar", "manifest.json") == "http://h:1/a/manifest.json"
    assert sibling("s3://bucket/x/train-000001.tar", "classes.txt") == "s3://bucket/x/classes.txt"
    assert sibling("pipe:curl -s http://h/a/train-000001.tar", "manifest.json") == "pipe:curl -s http://h/a/manifest.json"
    assert sibling("pipe:aws s3 cp s3://b/train-000001.tar -", "classes.txt") == "pipe:aws s3 cp s3://b/classes.txt -"
    assert shard_name("pipe:curl -s 'http://h/a/train-000001.tar'") == "train-000001.tar"
    with pytest.raises(ConfigError, match=r"shard URL scheme 'ftp://' is not supported \(ftp://h/a.tar\)"):
        scheme("ftp://h/a.tar")


@pytest.mark.parametrize("how", ["http", "pipe"])
def test_shards_over_http_train_as_local_ones(how: str, server: HttpServer, local_run: dict, tmp_path: Path) -> None:
    """Two epochs, two workers: the figures of the local run, the manifest and class list read beside the shards
    (for pipe: the same command pointed at them)."""
    spec = f"{server.url}/{TRAIN}" if how == "http" else f"pipe:curl -s --fail {server.url}/{TRAIN}"
    val = f"{server.url}/val-000000.tar" if how == "http" else f"pipe:curl -s --fail {server.url}/val-000000.tar"
    metrics = train(compose(["data=webdataset", f"data.shards='{spec}'", f"data.val_shards='{val}'", *ARGS]),
                    tmp_path / "run")
    assert figures(metrics) == figures(local_run)
    fetched = Counter(server.gets())
    assert set(fetched) == {f"train-00000{i}.tar" for i in range(4)}
    assert sum(fetched.values()) == 2 * 4  # each train shard once per epoch (2 epochs): no worker fetches another's


def stop_after_epoch_1(args: list[str], run: Path, server: HttpServer, cwd: Path) -> subprocess.Popen:
    """``python -m vitrain.train`` started into ``run``; the server stopped as soon as epoch 1's last.pt exists."""
    proc = subprocess.Popen([sys.executable, "-m", "vitrain.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    server.stop()
    return proc


@pytest.mark.slow
def test_a_server_that_goes_away_is_named_in_one_line_and_last_pt_kept(server: HttpServer, tmp_path: Path) -> None:
    """The server killed after epoch 1: retried for data.retry_seconds, then one line (no 'corrupt', no
    skip_corrupt advice) naming the URL, the cause, last.pt and the command that resumes."""
    run = tmp_path / "run"
    args = ["data=webdataset", f"data.shards='{server.url}/{TRAIN}'", f"data.val_shards='{server.url}/val-000000.tar'",
            *ARGS, "data.retry_seconds=3", f"hydra.run.dir={run}"]
    proc = stop_after_epoch_1(args, run, server, tmp_path)
    stopped = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert time.time() - stopped < 3 + 30  # the retry window, then the exit (imports and teardown included)
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    # a train shard of epoch 2, or the validation shard: which one the run reads when the server goes depends on
    # how far epoch 2 got while epoch 1's last.pt was written (in the background)
    assert line.startswith((f"error: {server.url}/train-", f"error: {server.url}/val-"))
    assert "Connection refused" in line
    assert "truncated or corrupt" not in line and "data.skip_corrupt does not apply" in line
    assert f"{run}/checkpoints/last.pt is kept" in line and "trainer.resume=auto" in line
    assert "Traceback" not in err and (run / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_a_server_back_within_the_window_lets_the_run_finish(server: HttpServer, local_run: dict,
                                                             tmp_path: Path) -> None:
    """Killed after epoch 1 and started again 2 s later on the same port: the run goes on at the byte it reached
    and ends with the uninterrupted figures."""
    run = tmp_path / "run"
    args = ["data=webdataset", f"data.shards='{server.url}/{TRAIN}'", f"data.val_shards='{server.url}/val-000000.tar'",
            *ARGS, "data.retry_seconds=60", f"hydra.run.dir={run}"]
    proc = stop_after_epoch_1(args, run, server, tmp_path)
    time.sleep(2)
    server.start()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert figures(json.loads((run / "metrics.json").read_text())) == figures(local_run)


@pytest.fixture(scope="module")
def s3(shards: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with the shards, manifest and class list uploaded by boto3; the environment
    that points s3fs at it (AWS_ENDPOINT_URL and test credentials)."""
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_for_port(port)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket="data")
        for path in shards.iterdir():
            client.upload_file(str(path), "data", f"shards/{path.name}")
        yield env
    finally:
        proc.kill()
        proc.wait()


def test_shards_from_s3_train_as_local_ones(s3: dict[str, str], local_run: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    metrics = train(compose(["data=webdataset", f"data.shards='s3://data/shards/{TRAIN}'",
                             "data.val_shards='s3://data/shards/val-000000.tar'", *ARGS]), tmp_path / "run")
    assert figures(metrics) == figures(local_run)


def test_data_manifest_names_the_counts_and_classes_elsewhere(shards: Path, local_run: dict, tmp_path: Path) -> None:
    """Shards served without manifest.json or classes.txt beside them: data.manifest (here a local file; a URL
    works alike) gives the counts of the train and val shards and the class names."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        os.link(tar, bare / tar.name)
    served = HttpServer(bare, tmp_path / "http.log").start()
    try:
        args = ["data=webdataset", f"data.shards='{served.url}/{TRAIN}'",
                f"data.val_shards='{served.url}/val-000000.tar'", *ARGS]
        with pytest.raises(ConfigError, match="set data.manifest=PATH_OR_URL"):
            train(compose(args), tmp_path / "refused")
        metrics = train(compose([*args, f"data.manifest={shards / 'manifest.json'}"]), tmp_path / "run")
    finally:
        served.stop()
    assert figures(metrics) == figures(local_run)
