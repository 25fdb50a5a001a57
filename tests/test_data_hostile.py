"""Hostile and broken input files: a CIFAR pickle that would run code, malformed CIFAR files, decompression
bombs, symlink loops in image folders, and unreadable images skipped with ``data.skip_corrupt``. Each is a
real file on disk; each fault is one line naming the file, or (skip_corrupt) a run that goes on and counts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_batch import run_cases
from conftest import write_cifar10
from formats import image_ids, write_id_folder
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets
from torchvision.transforms.v2.functional import pil_to_tensor

from vitrain.data import DataConfig, build_datasets, cpu_loaders
from vitrain.data.datasets import ImageFolder, load_cifar, load_imagefolder
from vitrain.data.sources import HFImages, count_skipped, load_filelist, open_rgb
from vitrain.errors import ConfigError, DataError, first_line
from vitrain.tracking import skipped_samples

FLAT = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], hflip=False, crop_padding=0, batch_size=4)
BATCH = "expected a dict with 'data' (N x 3072 uint8) and 'labels' (N labels in 0..9)"
BOMB = "(a guard against decompression bombs); if the image is genuine, raise data.max_image_pixels (null: no limit)"


class RunsCode:
    """A pickle payload: loading it calls ``call(*args)``."""

    def __init__(self, call: Callable, *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


# ---------------------------------------------------------------- CIFAR files: code in a pickle, malformed files

def marker_of(root: Path) -> Path:
    return root.parent / "pwned"


def malicious(entry: dict, root: Path) -> dict:
    return {**entry, "data": RunsCode(os.system, f"touch {marker_of(root)}")}


def labels_out_of_range(entry: dict, root: Path) -> dict:
    return {**entry, "labels": [3] * (len(entry["labels"]) - 1) + [12]}


# name: (file, what it holds instead of the real content, the message after the file's path)
CIFAR_CASES = {
    "runs_code": ("data_batch_2", malicious, f": it calls {os.system.__module__}.system, which no CIFAR file holds (a "
                  f"pickle runs what it names); nothing was executed; replace it with the file from the CIFAR archive"),
    "not_a_dict": ("data_batch_2", lambda e, r: [1, 2], f" is not a CIFAR batch: {BATCH}, found a list of 2; replace "
                   f"the file"),
    "no_labels": ("data_batch_2", lambda e, r: {k: v for k, v in e.items() if k != "labels"},
                  f" is not a CIFAR batch: {BATCH}, found keys ['batch_label', 'data', 'filenames']; replace the file"),
    "wrong_shape": ("data_batch_2", lambda e, r: {**e, "data": e["data"][:, :1024]},
                    f" is not a CIFAR batch: {BATCH}, found 'data' as a uint8 array (20, 1024); replace the file"),
    "wrong_dtype": ("test_batch", lambda e, r: {**e, "data": e["data"].astype(np.float32)},
                    f" is not a CIFAR batch: {BATCH}, found 'data' as a float32 array (30, 3072); replace the file"),
    "labels_count": ("data_batch_5", lambda e, r: {**e, "labels": e["labels"][:-1]},
                     f" is not a CIFAR batch: {BATCH}, found 'labels' as a list of 19 for 20 images; replace the file"),
    "labels_range": ("data_batch_1", labels_out_of_range,
                     f" is not a CIFAR batch: {BATCH}, found 'labels' with values from 3 to 12; replace the file"),
    "meta_no_names": ("batches.meta", lambda e, r: {"num_cases_per_batch": 20},
                      " is not a CIFAR meta file: expected a dict with 'label_names' (a list of class names), found "
                      "keys ['num_cases_per_batch']; replace the file"),
    "not_a_pickle": ("data_batch_3", lambda e, r: b"\x80\x05 not a pickle",
                     ": UnpicklingError; the file is corrupt, replace it"),
}


def write_bad_cifar(root: Path, case: str) -> str:
    """A CIFAR-10 folder under ``root`` with the fault of ``case``; returns the one-line message expected."""
    written = write_cifar10(root)
    name, content, tail = CIFAR_CASES[case]
    path = root / "cifar-10-batches-py" / name
    bad = content(written.get(name, {}), root)
    path.write_bytes(bad if isinstance(bad, bytes) else pickle.dumps(bad))
    head = "refused to read " if case == "runs_code" else "cannot read " if case == "not_a_pickle" else ""
    return f"{head}{path}{tail}"


@pytest.mark.parametrize("case", CIFAR_CASES)
def test_a_bad_cifar_file_is_one_line_naming_it(tmp_path: Path, case: str) -> None:
    expected = write_bad_cifar(tmp_path / "cifar", case)
    with pytest.raises(DataError) as error:
        load_cifar("cifar10", tmp_path / "cifar", download=False)
    assert str(error.value) == expected
    assert not marker_of(tmp_path / "cifar").exists()  # the payload ran nothing


@pytest.mark.parametrize("call", [eval, exec, getattr, __import__])
def test_no_other_callable_passes_the_cifar_unpickler(tmp_path: Path, call: Callable) -> None:
    written = write_cifar10(tmp_path / "cifar")
    entry = {**written["data_batch_1"], "labels": RunsCode(call, f"__import__('os').system('touch {tmp_path}/pwned')")}
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=rf"it calls __builtin__\.{call.__name__}, .*; nothing was executed"):
        load_cifar("cifar10", tmp_path / "cifar", download=False)  # protocol 2 names Python 2's module
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("numpy_1", [False, True])
@pytest.mark.parametrize("protocol", [2, 5])
def test_real_cifar_pickles_load(tmp_path: Path, protocol: int, numpy_1: bool) -> None:
    """The layout the archive holds, pickled at protocol 2 (bytes as _codecs.encode, arrays as _reconstruct) and 5
    (numpy's _frombuffer), with numpy 2's module paths and numpy 1's (numpy.core)."""
    written = write_cifar10(tmp_path / "cifar")
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    for name, entry in written.items():
        data = pickle.dumps(entry, protocol=protocol)
        if numpy_1:
            assert protocol == 2 or b"numpy._core" in data
            data = data.replace(b"numpy._core", b"numpy.core") if protocol == 2 else data
        (folder / name).write_bytes(data)
    train, test, names = load_cifar("cifar10", tmp_path / "cifar", download=False)
    assert names[:2] == ["airplane", "automobile"] and len(train) == 100 and len(test) == 30
    first = written["data_batch_1"]
    assert train.labels[:20].tolist() == first["labels"]
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))


# ---------------------------------------------------------------- decompression bombs

def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels, with no pixel data (a few bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_one_line_naming_the_file_and_the_limit(tmp_path: Path) -> None:
    bomb = write_png_header(tmp_path / "bomb.png", 20_000, 20_000)
    with pytest.raises(DataError) as error:
        open_rgb(bomb)
    assert str(error.value) == f"image {bomb} has 400,000,000 pixels, over the limit of data.max_image_pixels=" \
                               f"89478485 {BOMB}"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 == DataConfig().max_image_pixels  # PIL's default, left as it was


def test_the_pixel_limit_is_data_max_image_pixels_and_pils_warning_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "small.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(image)  # 1,200 pixels
    with pytest.raises(DataError, match=f"^image {image} has 1,200 pixels, over the limit of data.max_image_pixels"):
        open_rgb(image, max_pixels=1000)  # over the limit, under twice it: PIL only warns
    assert open_rgb(image, max_pixels=1200).size == (40, 30)
    tall = write_png_header(tmp_path / "tall.png", 1, 200_000_000)
    with pytest.raises(DataError, match=r"\(OSError\); remove"):  # null: no limit; PIL reads on, to the missing pixels
        open_rgb(tall, max_pixels=None)
    with pytest.raises(ConfigError, match="data.max_image_pixels must be positive"):
        DataConfig(max_image_pixels=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_pixel_limit_holds_in_loader_workers_and_the_error_names_the_file(tmp_path: Path, workers: int) -> None:
    root = write_id_folder(tmp_path / "ids", train=2, val=1)
    bomb = write_png_header(root / "train" / "bee" / "1.png", 20_000, 20_000)
    train, _ = cpu_loaders(build_datasets(DataConfig(name="imagefolder", root=str(root), **FLAT), 16), 4, workers)
    with pytest.raises(DataError) as error:
        list(train)
    assert first_line(error.value, 2000) == f"image {bomb} has 400,000,000 pixels, over the limit of " \
                                      f"data.max_image_pixels=89478485 {BOMB}"
    bomb.unlink()  # every image now has 1,200 pixels: over a limit that only the workers' own setting can know
    cfg = DataConfig(name="imagefolder", root=str(root), max_image_pixels=1000, **FLAT)
    train, _ = cpu_loaders(build_datasets(cfg, 16), 4, workers)
    with pytest.raises(DataError) as error:
        list(train)
    assert first_line(error.value, 2000).endswith(f"1,200 pixels, over the limit of data.max_image_pixels=1000 {BOMB}")


# ---------------------------------------------------------------- symlinks in image folders

def test_a_symlink_back_up_the_tree_is_passed_over_with_a_warning(imagefolder_root: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    train = imagefolder_root / "train"
    expected = ImageFolder(str(train)).samples
    (train / "circle" / "up").symlink_to("..")  # a loop: train/circle/up/circle/up/...
    (train / "square" / "top").symlink_to("../../..")  # above the data root
    (train / "square" / "circles").symlink_to("../circle")  # another class's folder: wrong labels
    with caplog.at_level(logging.WARNING):
        folder, _, _ = load_imagefolder(imagefolder_root)
    assert folder.samples == expected and len(expected) == 12
    warned = caplog.text
    assert f"passing over {train}/circle/up -> {train} (a link back up the tree: a loop)" in warned
    assert f"passing over {train}/square/top -> {imagefolder_root.parent.parent}" in warned
    assert f"passing over {train}/square/circles -> {train}/circle (that folder is read already)" in warned


def test_a_symlink_to_a_folder_elsewhere_is_followed_once(imagefolder_root: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    (extra / "deeper").mkdir(parents=True)
    for name in ("a.png", "b.png", "deeper/c.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(extra / name)
    train = imagefolder_root / "train"
    (train / "circle" / "more").symlink_to(extra)
    (train / "square" / "again").symlink_to(extra)  # the same folder a second time: read once, for circle
    folder = ImageFolder(str(train))
    linked = [(p, y) for p, y in folder.samples if "/more/" in p or "/again/" in p]
    assert len(folder.samples) == 15
    assert linked == [(f"{train}/circle/more/{n}", 0) for n in ("a.png", "b.png", "deeper/c.png")]


def test_a_tree_without_links_lists_what_torchvision_lists_in_its_order(imagefolder_root: Path) -> None:
    train = imagefolder_root / "train"
    for sub in ("a/b", "a-x", "a/c"):  # a-x sorts between a and a/b as strings, after them as a walk
        (train / "circle" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(train / "circle" / sub / "0.png")
    assert ImageFolder(str(train)).samples == tv_datasets.ImageFolder(str(train)).samples


# ---------------------------------------------------------------- data.skip_corrupt for files

def id_folder_with_a_broken_image(root: Path) -> tuple[Path, Path]:
    """An id folder (30 train images, ids 0..29) whose image 13 (train/bee/3.png) is not an image."""
    folder = write_id_folder(root)
    broken = folder / "train" / "bee" / "3.png"
    broken.write_bytes(b"not a png")
    return folder, broken


def epoch_ids(loader: Any, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [image_ids(images) for images, _ in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_stops_training_with_its_name(tmp_path: Path, workers: int) -> None:
    folder, broken = id_folder_with_a_broken_image(tmp_path)
    train, _ = cpu_loaders(build_datasets(DataConfig(name="imagefolder", root=str(folder), **FLAT), 16), 4, workers)
    with pytest.raises(DataError) as error:
        list(train)
    assert first_line(error.value, 2000) == f"cannot read image {broken} (UnidentifiedImageError); remove or replace " \
                                            f"the file"


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_replaces_an_unreadable_image_within_its_batch_and_counts_it(
        tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture) -> None:
    folder, broken = id_folder_with_a_broken_image(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(folder), skip_corrupt=True, **FLAT)
    train, _ = cpu_loaders(build_datasets(cfg, 16), 4, workers, seed=3)
    with caplog.at_level(logging.WARNING):
        epochs = [epoch_ids(train, epoch) for epoch in range(2)]
    for batches in epochs:
        assert len(batches) == len(train) == 8  # 30 images, batches of 4: as many steps as without the fault
        ids = [i for batch in batches for i in batch]
        assert len(ids) == 30 and 13 not in ids and len(set(ids)) == 29
        (batch,) = [b for b in batches if len(set(b)) < len(b)]  # the stand-in is a readable image of its batch
        assert len(set(batch)) == len(batch) - 1
    assert train.skipped == 2 and skipped_samples(train) == {"skipped_corrupt": 2}  # over both epochs
    again, _ = cpu_loaders(build_datasets(cfg, 16), 4, workers, seed=3)
    assert [epoch_ids(again, epoch) for epoch in range(2)] == epochs  # the same stand-in in every run
    if workers == 0:  # workers log in their own processes
        assert f"data.skip_corrupt: cannot read image {broken} (UnidentifiedImageError)" in caplog.text


def test_skip_corrupt_counts_only_the_training_images(tmp_path: Path) -> None:
    """With data.val_fraction the validation set is a copy of the training folder: its skips are not the train
    loader's."""
    folder = write_id_folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(folder / "train"), skip_corrupt=True, val_fraction=0.5, **FLAT)
    splits = build_datasets(cfg, 16)
    for split in (splits.train, splits.val):  # one broken image in each half
        Path(split.dataset.samples[split.indices[0]][0]).write_bytes(b"not a png")
    train, val = cpu_loaders(splits, 4, 0)
    ids = [i for images, _ in val for i in image_ids(images)] + [i for images, _ in train for i in image_ids(images)]
    assert len(ids) == 30 and len(set(ids)) == 28
    assert train.skipped == 1 and not hasattr(val, "skipped")


def test_skip_corrupt_in_a_file_list(tmp_path: Path) -> None:
    folder, broken = id_folder_with_a_broken_image(tmp_path)
    rows = [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted((folder / "train").rglob("*.png"))]
    (folder / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    for skip in (False, True):
        files, _, _ = load_filelist(folder / "train.csv", None, skip_corrupt=skip)
        files.transform = pil_to_tensor
        loader = count_skipped(DataLoader(files, batch_size=4))
        if not skip:
            with pytest.raises(DataError, match=f"^cannot read image {broken} "):
                list(loader)
            continue
        assert sum(len(images) for images, _ in loader) == 30 and loader.skipped == 1


def test_skip_corrupt_in_hugging_face_data(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [{"bytes": good.read_bytes(), "path": None}] * 2 + [{"bytes": b"junk", "path": None}]
    table = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1]}, features=features)
    with pytest.raises(DataError) as error:
        HFImages(table, "image", "label", ["a", "b"])[2]
    assert str(error.value) == "cannot read the image in row 2 of the Hugging Face data (UnidentifiedImageError); " \
                               "fix or remove that row"
    hf = HFImages(table, "image", "label", ["a", "b"], skip_corrupt=True)
    hf.transform = pil_to_tensor
    loader = count_skipped(DataLoader(hf, batch_size=3))
    ((_, labels),) = list(loader)
    assert labels.tolist() == [0, 1, 1] and loader.skipped == 1  # row 2 stands in by its batch's last readable


# ---------------------------------------------------------------- the command line

def cli_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """Command-line arguments and the stderr expected, one per bad input, with their files written."""
    cases = {}
    for case in CIFAR_CASES:
        expected = write_bad_cifar(root / case, case)
        cases[case] = (["data=cifar10", f"data.root={root / case}", "data.download=false"], f"error: {expected}")
    ids = write_id_folder(root / "ids", train=2, val=1)
    cases["bomb"] = (["data=imagefolder", f"data.root={ids}", "data.max_image_pixels=1000"],
                     f"error: image {ids}/train/")
    folder, broken = id_folder_with_a_broken_image(root / "broken")
    cases["corrupt"] = (["data=imagefolder", f"data.root={folder}"],
                        f"error: cannot read image {broken} (UnidentifiedImageError); remove or replace the file")
    cases["skip_corrupt"] = (["data=imagefolder", f"data.root={folder}", "data.skip_corrupt=true"], "")
    return cases


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every command-line case through the real entry point, in one process (tests/cli_batch.py)."""
    root = tmp_path_factory.mktemp("cli")
    cases = cli_cases(root)
    args = [[*cases[name][0], "trainer.epochs=2", "data.batch_size=4", "data.num_workers=2", "trainer.progress=false",
             f"hydra.run.dir={root}/run_{name}"] for name in cases]
    results = run_cases("vitrain.train", args, root)
    return {name: (result, cases[name][1], root / f"run_{name}") for name, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("case", [*CIFAR_CASES, "bomb", "corrupt"])
def test_the_command_line_prints_one_error_line(cli_runs: dict[str, Any], case: str) -> None:
    result, expected, _ = cli_runs[case]
    stderr = result["stderr"].strip()
    assert result["code"] == 1, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(expected), stderr
    if case == "bomb":
        assert stderr.endswith(f"has 1,200 pixels, over the limit of data.max_image_pixels=1000 {BOMB}")


def test_a_run_with_skip_corrupt_counts_the_skipped_images_in_each_epochs_row(cli_runs: dict[str, Any]) -> None:
    result, _, run = cli_runs["skip_corrupt"]
    assert result["code"] == 0, result["stderr"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 8  # 30 images, batches of 4: the broken one does not shorten an epoch
    assert [row["skipped_corrupt"] for row in metrics["history"]] == [1, 2]
