"""evaluate and predict on a checkpoint made by a short digits run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vitrain.config import compose
from vitrain.data.datasets import load_digits
from vitrain.errors import DataError
from vitrain.evaluate import evaluate_checkpoint
from vitrain.predict import predict
from vitrain.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    metrics = train(compose(["trainer.epochs=3", "data.batch_size=128", "trainer.progress=false", "trainer.ema=true",
                             "trainer.ema_decay=0.9", "optimizer.lr=3e-3"]), out)
    return out / "checkpoints", metrics


def test_evaluate_top1_equals_the_trainers(run: tuple[Path, dict]) -> None:
    checkpoints, metrics = run
    result = evaluate_checkpoint(checkpoints / "last.pt")
    r = result["model"]
    assert r["top1"] == pytest.approx(metrics["final_top1"])
    assert result["model_ema"]["top1"] == pytest.approx(metrics["final_top1_ema"])
    assert r["top1"] <= r["top5"] <= 100 and r["images"] == 360
    confusion = r["confusion"]
    _, test, _ = load_digits()
    assert [sum(row) for row in confusion] == test.labels.bincount().tolist()  # rows: the true classes
    assert r["per_class_top1"][0] == pytest.approx(100 * confusion[0][0] / 36)
    saved = json.loads((checkpoints / "eval_last.json").read_text())
    assert saved["model"]["top1"] == r["top1"]
    width, height = Image.open(checkpoints / "eval_last.png").size  # the matrix, its labels and a colour bar
    assert width > height >= 400


def test_predict_gives_probabilities_and_class_names(run: tuple[Path, dict], tmp_path: Path) -> None:
    checkpoints, _ = run
    _, test, _ = load_digits()
    for i in range(4):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    results = predict(checkpoints / "best.pt", tmp_path, topk=10)
    assert len(results) == 4
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
        assert {t["class"] for t in r["top"]} == {str(c) for c in range(10)}
    assert len(predict(checkpoints / "best.pt", tmp_path / "0.png", topk=3)[0]["top"]) == 3
    with pytest.raises(DataError, match="no images at inputs="):
        predict(checkpoints / "best.pt", tmp_path / "nothing")


def test_cli_evaluate_and_predict(run: tuple[Path, dict], tmp_path: Path) -> None:
    checkpoints, metrics = run
    ev = subprocess.run([sys.executable, "-m", "vitrain.evaluate", f"checkpoint={checkpoints / 'last.pt'}",
                         f"output={tmp_path / 'eval.json'}", f"hydra.run.dir={tmp_path}/ev"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert f"top-1 {metrics['final_top1']:.2f}%" in ev.stdout
    Image.new("RGB", (20, 20)).save(tmp_path / "blank.png")
    pr = subprocess.run([sys.executable, "-m", "vitrain.predict", f"checkpoint={checkpoints / 'best.pt'}",
                         f"inputs={tmp_path / 'blank.png'}", f"hydra.run.dir={tmp_path}/pr"],
                        capture_output=True, text=True, timeout=300)
    assert pr.returncode == 0, pr.stderr
    assert len(json.loads((tmp_path / "pr" / "predictions.json").read_text())[0]["top"]) == 5
