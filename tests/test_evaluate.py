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
from vitrain.errors import ConfigError, DataError
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
                         f"output={tmp_path / 'eval.json'}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert f"top-1 {metrics['final_top1']:.2f}%" in ev.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["top1"] == pytest.approx(metrics["final_top1"])
    Image.new("RGB", (20, 20)).save(tmp_path / "blank.png")
    pr = subprocess.run([sys.executable, "-m", "vitrain.predict", f"checkpoint={checkpoints / 'best.pt'}",
                         f"inputs={tmp_path / 'blank.png'}", f"output={tmp_path / 'pr.json'}"],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert pr.returncode == 0, pr.stderr
    written = json.loads((tmp_path / "pr.json").read_text())
    assert written["checkpoint"] == str(checkpoints / "best.pt") and len(written["class_names"]) == 10
    assert written["preprocess"]["img_size"] == 16 and len(written["predictions"][0]["top"]) == 5
    as_csv = subprocess.run([sys.executable, "-m", "vitrain.predict", f"checkpoint={checkpoints / 'best.pt'}",
                                f"inputs={tmp_path / 'blank.png'}", "format=csv", "topk=2"],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert as_csv.returncode == 0, as_csv.stderr
    rows = (checkpoints.parent / "predictions" / "blank.best.pt.csv").read_text().splitlines()
    assert rows[0] == "image,class_1,probability_1,class_2,probability_2" and len(rows) == 2
    assert rows[1].startswith(f"{tmp_path / 'blank.png'},")


@pytest.mark.slow
def test_the_commands_write_nothing_into_the_working_folder(run: tuple[Path, dict], tmp_path: Path) -> None:
    """evaluate, predict, visualize and export from an empty folder: no outputs/<entry>/<date>/<time>/, no .hydra/, no
    log file there; their files go beside the checkpoint."""
    checkpoints, _ = run
    image = tmp_path / "digit.png"
    Image.fromarray(load_digits()[1].images[0].permute(1, 2, 0).numpy()).save(image)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    commands = {"evaluate": [f"checkpoint={checkpoints / 'best.pt'}"],
                "predict": [f"checkpoint={checkpoints / 'best.pt'}", f"inputs={image}"],
                "visualize": [f"checkpoint={checkpoints / 'best.pt'}", f"image={image}"],
                "export": [f"checkpoint={checkpoints / 'best.pt'}", "format=safetensors"]}
    for entry, args in commands.items():
        result = subprocess.run([sys.executable, "-m", f"vitrain.{entry}", *args, "device=cpu" if entry != "export"
                                 else "weights=raw"], capture_output=True, text=True, timeout=300, cwd=cwd)
        assert result.returncode == 0, f"{entry}: {result.stderr[-2000:]}"
        assert sorted(p.name for p in cwd.rglob("*")) == [], entry
    run_dir = checkpoints.parent
    assert (checkpoints / "eval_best.json").is_file() and (checkpoints / "best.safetensors").is_file()
    assert (run_dir / "predictions" / "digit.best.pt.json").is_file()
    assert list((run_dir / "visualize").glob("digit_*.png"))


def write_digit_folder(root: Path, start: int) -> Path:
    """``root/train|val/<digit>/*.png``: two test digits of each class per split, from test image ``start`` on."""
    _, test, _ = load_digits()
    for split in ("train", "val"):
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
    for i in range(start, len(test)):
        label = int(test.labels[i])
        for split in ("train", "val"):
            folder = root / split / str(label)
            if len(list(folder.iterdir())) < 2:
                Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
                break
    return root


def test_evaluating_on_other_data_keeps_each_data_sets_results(run: tuple[Path, dict], tmp_path: Path) -> None:
    """data=... writes eval_<checkpoint>_<data set>.json and .png: the checkpoint's own evaluation and every other
    data set's stay; a second folder of the same name is refused rather than written over the first's results."""
    from vitrain.data.config import DataConfig

    checkpoints, _ = run
    own = evaluate_checkpoint(checkpoints / "best.pt", device="cpu")
    first = DataConfig(name="imagefolder", root=str(write_digit_folder(tmp_path / "a" / "photos", 0)))
    other = DataConfig(name="imagefolder", root=str(write_digit_folder(tmp_path / "scans", 100)))
    evaluate_checkpoint(checkpoints / "best.pt", first, device="cpu")
    evaluate_checkpoint(checkpoints / "best.pt", other, device="cpu")
    saved = {name: json.loads((checkpoints / f"eval_best{name}.json").read_text())
             for name in ("", "_imagefolder-photos", "_imagefolder-scans")}
    assert saved[""]["data"] == "digits" and saved[""]["model"]["top1"] == own["model"]["top1"]
    assert saved["_imagefolder-photos"]["data_source"] == first.root and saved["_imagefolder-photos"]["model"][
        "images"] == 20
    assert saved["_imagefolder-scans"]["data_source"] == other.root
    assert all((checkpoints / f"eval_best{name}.png").is_file() for name in saved)

    same_name = DataConfig(name="imagefolder", root=str(write_digit_folder(tmp_path / "b" / "photos", 200)))
    with pytest.raises(ConfigError) as error:
        evaluate_checkpoint(checkpoints / "best.pt", same_name, device="cpu")
    assert str(error.value) == (f"{checkpoints / 'eval_best_imagefolder-photos.json'} holds the evaluation on "
                                f"{first.root}, another data set; give output=... to keep both, or remove it")
    assert json.loads((checkpoints / "eval_best_imagefolder-photos.json").read_text()) == saved["_imagefolder-photos"]


@pytest.mark.parametrize("classes", [2, 10, 60])
def test_the_confusion_figures_title_and_colour_bar_label_fit_inside_it(classes: int) -> None:
    """The figure evaluate saves (at 120 dpi), with a long title on a small matrix: every label lies inside."""
    from vitrain.figures import confusion_figure

    title = "vit_nano_patch4_16 on imagefolder-holiday_photos_2024: top-1 97.25%"
    figure = confusion_figure([[1] * classes for _ in range(classes)], [f"c{i}" for i in range(classes)], title)
    figure.set_dpi(120)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (heading,) = [t for t in figure.texts if t.get_text() == title]
    colour_bar = figure.axes[1]
    assert colour_bar.get_ylabel() == "share of the true class"
    inside = figure.bbox.padded(0.5)  # half a pixel of rounding
    for text in (heading, colour_bar.yaxis.label, figure.axes[0].xaxis.label, figure.axes[0].yaxis.label):
        box = text.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (
            text.get_text(), box, figure.bbox)


def test_evaluate_at_the_weights_test_size_on_request(run: tuple[Path, dict], tmp_path: Path) -> None:
    """``img_size=test``: the test size the checkpoint records (timm's test_input_size of its starting weights), the
    position embedding resampled by timm's resample_abs_pos_embed (4x4 -> 6x6 patches), named in the file and JSON;
    never by default."""
    import shutil

    import torch
    from timm.layers import resample_abs_pos_embed

    from vitrain.checkpoint import load_checkpoint
    from vitrain.inference import load_trained

    checkpoint = tmp_path / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copy(run[0] / "best.pt", checkpoint)
    state = load_checkpoint(checkpoint)
    with pytest.raises(ConfigError, match="records no test size"):
        evaluate_checkpoint(checkpoint, img_size="test")
    state["preprocess"]["test_img_size"] = 24
    torch.save(state, checkpoint)
    trained = load_trained(checkpoint, "cpu", "test")
    assert (trained.preprocess["img_size"], trained.trained_size) == (24, 16)
    want = resample_abs_pos_embed(state["model"]["pos_embed"], [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.allclose(trained.model.pos_embed.detach(), want, atol=1e-6)
    result = evaluate_checkpoint(checkpoint, img_size="test", batch_size=128)
    assert (result["img_size"], result["trained_img_size"]) == (24, 16)
    assert json.loads((checkpoint.parent / "eval_best_24.json").read_text())["img_size"] == 24
    assert evaluate_checkpoint(checkpoint, batch_size=128)["img_size"] == 16  # the default: as it trained
    assert evaluate_checkpoint(checkpoint, img_size=32, batch_size=128)["img_size"] == 32
    assert (checkpoint.parent / "eval_best_32.json").is_file()


@pytest.mark.parametrize(("arg", "message"), [
    ("batch_size=0", "error: batch_size must be at least 1, got 0"),
    ("device=tpu", "error: device=tpu is not a device PyTorch knows; use auto, cpu, cuda or cuda:N"),
])
def test_evaluate_refuses_a_bad_value_in_one_line(run: tuple[Path, dict], tmp_path: Path, arg: str,
                                                   message: str) -> None:
    checkpoints, _ = run
    result = subprocess.run([sys.executable, "-m", "vitrain.evaluate", f"checkpoint={checkpoints / 'last.pt'}", arg],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [message + result.stderr.strip().removeprefix(message)]
    assert result.stderr.startswith(message)
