"""The data formats beyond in-memory sets: WebDataset shards, a CSV file list, Hugging Face datasets, one
folder split by data.val_fraction; each yields the images and labels of the folder it was made from, shards
are dealt out once per epoch over ranks and workers, and bad input is one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from formats import CLASSES, image_ids, make_shards, write_id_folder, write_photo_folder
from torchvision.transforms.v2.functional import pil_to_tensor

from vitrain.data import build_datasets, build_loaders, cpu_eval_loader
from vitrain.data.config import DataConfig
from vitrain.data.datasets import load_imagefolder
from vitrain.data.shards import ShardLoader, open_shards
from vitrain.data.sources import load_filelist, load_hf
from vitrain.errors import ConfigError, DataError

FLAT = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], hflip=False, crop_padding=0, batch_size=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An id folder (3 classes x 10 train / 3 val) and its shards, 7 samples per shard (uneven: 7,7,7,7,2)."""
    root = write_id_folder(tmp_path_factory.mktemp("ids") / "folder")
    make_shards(root, root.parent / "shards", per_shard=7)
    return root.parent


def shard_config(base: Path, **extra: object) -> DataConfig:
    paths = dict(shards=str(base / "shards/train-{000000..000004}.tar"),
                 val_shards=str(base / "shards/val-{000000..000001}.tar"))
    return DataConfig(name="webdataset", **{**paths, **FLAT, **extra})


def fingerprints(pairs: object) -> list[tuple[str, int]]:
    """(hash of the pixels, label) of every (image tensor, label), sorted: equal multisets compare equal."""
    return sorted((hashlib.sha1(image.numpy().tobytes()).hexdigest(), int(label)) for image, label in pairs)


def folder_pairs(folder: Path) -> list[tuple[str, int]]:
    train, _, names = load_imagefolder(folder)
    assert names == list(CLASSES)
    train.transform = pil_to_tensor
    return fingerprints(train)


def test_shards_hold_the_images_and_labels_of_their_folder(photos: Path, tmp_path: Path) -> None:
    manifest = make_shards(photos, tmp_path / "shards", per_shard=5)
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 3, 5, 1]  # 18 train, 6 val
    assert (tmp_path / "shards/classes.txt").read_text().split() == list(CLASSES)
    stream = open_shards(str(tmp_path / "shards/train-{000000..000003}.tar"), False, 0, False)
    stream.transform = pil_to_tensor
    assert stream.classes == list(CLASSES) and len(stream) == 18
    loader = ShardLoader(stream, 1, 2, seed=0, rank=0, world_size=1)
    assert fingerprints((x[0], y[0]) for x, y in loader) == folder_pairs(photos / "train")


def test_a_file_list_and_hf_data_hold_the_images_of_their_folder(photos: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = ["path,label"] + [f"train/{c}/{i}.jpg,{c}" for c in CLASSES for i in range(6)]
    (photos / "list.csv").write_text("\n".join(rows))
    train, val, names = load_filelist(photos / "list.csv", None)
    assert names == list(CLASSES) and val is None
    train.transform = pil_to_tensor
    expected = folder_pairs(photos / "train")
    assert fingerprints(train) == expected
    images = [p for c in CLASSES for p in sorted((photos / "train" / c).glob("*.jpg"))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    table = datasets.Dataset.from_dict({"image": [str(p) for p in images],
                                        "label": [CLASSES.index(p.parent.name) for p in images]}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "train.parquet"))
    for path in (tmp_path / "saved", tmp_path / "train.parquet", photos / "train"):
        hf_train, _, hf_names = load_hf(str(path), "train", None, "image", "label")
        assert hf_names == list(CLASSES), path
        hf_train.transform = pil_to_tensor
        assert fingerprints(hf_train) == expected, path


def test_hf_data_with_string_labels_trains_with_its_sorted_names(photos: Path, tmp_path: Path) -> None:
    """A label column of strings (no ClassLabel feature): the class names are the training split's, sorted, as an
    image folder's; a validation label no training row has is one line naming it."""
    datasets = pytest.importorskip("datasets")
    images = [p for c in CLASSES for p in sorted((photos / "train" / c).glob("*.jpg"))]
    table = datasets.Dataset.from_dict({"image": [str(p) for p in images], "label": [p.parent.name for p in images]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("string")}))
    odd = datasets.Dataset.from_dict({"image": [str(images[0])], "label": ["zebra"]}, features=table.features)
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "strings"))
    hf_train, hf_val, names = load_hf(str(tmp_path / "strings"), "train", None, "image", "label")
    assert names == sorted(CLASSES) and hf_val is not None
    hf_train.transform = pil_to_tensor
    assert fingerprints(hf_train) == folder_pairs(photos / "train")  # the folder's labels: its sorted class names
    datasets.DatasetDict({"train": table, "validation": odd}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(DataError, match="row 0 of the Hugging Face data has label 'zebra', which no training row has"):
        load_hf(str(tmp_path / "odd"), "train", None, "image", "label")


def test_one_folder_is_split_by_val_fraction(ids: Path) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        build_datasets(DataConfig(name="imagefolder", root=str(ids / "folder/train"), **FLAT), 16)
    cfg = DataConfig(name="imagefolder", root=str(ids / "folder/train"), val_fraction=0.2, **FLAT)
    splits = build_datasets(cfg, 16)
    assert splits.test is None and splits.class_names == list(CLASSES)
    train, val = (torch.cat([x for x, _ in cpu_eval_loader(s, 8)]) for s in (splits.train, splits.val))
    assert sorted(image_ids(train) + image_ids(val)) == list(range(30)) and len(image_ids(val)) == 6
    labels = torch.cat([y for _, y in cpu_eval_loader(splits.val, 8)])
    assert labels.bincount().tolist() == [2, 2, 2]  # stratified


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_shard_sample_is_seen_once_per_epoch_over_ranks_and_workers(ids: Path, world: int,
                                                                        workers: int) -> None:
    splits = build_datasets(shard_config(ids), 16)
    seen, batches = [], set()
    for rank in range(world):
        loader = ShardLoader(splits.train, 4, workers, seed=1, rank=rank, world_size=world)
        loader.set_epoch(2)
        mine = [i for x, _ in loader for i in image_ids(x)]
        batches.add(len(loader))
        assert len(mine) == 30 // world
        seen += mine
    assert len(batches) == 1  # every rank makes the same number of steps
    assert len(set(seen)) == len(seen) == 30 - 30 % world  # the 30 % world left over wait for the next epoch
    val = [i for r in range(world) for x, _ in ShardLoader(splits.val, 4, workers, 1, r, world) for i in image_ids(x)]
    assert sorted(val) == list(range(30, 39))  # evaluation: every sample exactly once


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (1, 3), (2, 2)])
def test_workers_own_whole_shards_and_a_resume_from_any_batch_repeats_the_rest(ids: Path, world: int,
                                                                              workers: int) -> None:
    """Uneven shards (7,7,7,7,2): no shard is split between two workers of a rank (each is read once per rank),
    and resuming after any batch, the tail of joined short batches included, gives the rest of the epoch exactly."""
    splits = build_datasets(shard_config(ids, shuffle_buffer=8), 16)
    for rank in range(world):
        loader = ShardLoader(splits.train, 4, workers, seed=5, rank=rank, world_size=world)
        loader.set_epoch(1)
        runs = loader.stream.worker_pieces()
        owned = [shard for run in runs for shard, _, _ in run]
        assert len(owned) == len(set(owned))  # a shard is one worker's
        whole = [(x, y) for x, y in loader]
        assert sum(len(y) for _, y in whole) == 30 // world
        for start in range(1, len(whole)):
            loader.set_epoch(1, start=start * 4)
            rest = list(loader)
            assert len(rest) == len(whole) - start
            assert all(torch.equal(x, x0) and torch.equal(y, y0) for (x, y), (x0, y0) in zip(rest, whole[start:],
                                                                                              strict=True)), start


def test_shard_epochs_are_reproducible_and_resume_mid_epoch_exactly(ids: Path) -> None:
    splits = build_datasets(shard_config(ids, train_crop="rrc", hflip=True, shuffle_buffer=8), 16)
    loader = ShardLoader(splits.train, 4, 2, seed=3, rank=0, world_size=1)
    epochs = []
    for epoch in (0, 0, 1):
        loader.set_epoch(epoch)
        epochs.append([(x, y) for x, y in loader])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epochs[0], epochs[1], strict=True))
    assert image_ids(torch.cat([x for x, _ in epochs[0]])) != image_ids(torch.cat([x for x, _ in epochs[2]]))
    loader.set_epoch(0, start=3 * 4)  # resumed after 3 of the epoch's 8 batches
    rest = list(loader)
    assert len(rest) == len(loader) == 5
    for (x, y), (x0, y0) in zip(rest, epochs[0][3:], strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)  # the same images, crops and flips


def test_webdataset_trains_from_the_loaders_the_trainer_builds(ids: Path) -> None:
    cfg = shard_config(ids, mixup=0.8)  # mixup: a rank's short last batch is dropped
    splits = build_datasets(cfg, 16)
    train, val, test = build_loaders(splits, cfg, 16, torch.device("cpu"), 0)
    assert test is None and len(train) == 7 and all(x.shape == (4, 3, 16, 16) for x, _ in train)
    assert sum(len(y) for _, y in val) == 9


def write_bad_shard(ids: Path, tmp_path: Path, label: int | None = None, truncate: bool = False) -> Path:
    """A copy of the id shards in which train-000001.tar is cut short, or its first sample has ``label``."""
    import tarfile

    out = tmp_path / "bad"
    out.mkdir()
    for f in (ids / "shards").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    target = out / "train-000001.tar"
    if truncate:
        target.write_bytes(target.read_bytes()[:5000])
    if label is not None:
        with tarfile.open(target) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(target, "w") as tar:
            for i, (m, data) in enumerate(members):
                data = str(label).encode() if i < 2 and m.name.endswith(".cls") else data
                m.size = len(data)
                tar.addfile(m, __import__("io").BytesIO(data))
    return out


def test_a_truncated_shard_stops_with_its_name_or_is_skipped_and_counted(ids: Path, tmp_path: Path) -> None:
    bad = write_bad_shard(ids, tmp_path, truncate=True)
    cfg = shard_config(bad.parent, shards=str(bad / "train-{000000..000004}.tar"),
                       val_shards=str(bad / "val-{000000..000001}.tar"))
    loader = ShardLoader(build_datasets(cfg, 16).train, 4, 0, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"train-000001.tar is truncated or corrupt.*data.skip_corrupt=true"):
        list(loader)
    cfg.skip_corrupt = True
    loader = ShardLoader(build_datasets(cfg, 16).train, 4, 2, seed=0, rank=0, world_size=1)
    got = [i for x, _ in loader for i in image_ids(x)]
    assert len(got) == 30 and loader.skipped == 30 - len(set(got)) > 0  # missing samples filled and counted


def test_a_label_outside_the_classes_names_the_sample(ids: Path, tmp_path: Path) -> None:
    bad = write_bad_shard(ids, tmp_path, label=99)
    stream = open_shards(str(bad / "train-000001.tar"), False, 0, False)
    stream.transform = pil_to_tensor
    with pytest.raises(DataError, match=r"train-000001.tar: sample \S+ has label 99, outside the 3 classes"):
        list(ShardLoader(stream, 4, 0, 0, 0, 1))


@pytest.mark.parametrize(("extra", "expected"), [
    (dict(shards="{nothing}/x-{0..1}.tar"), "does not exist"),
    (dict(val_shards=None), "needs validation shards: set data.val_shards"),
    (dict(val_fraction=0.1), "data.val_fraction needs"),
])
def test_bad_shard_settings_are_one_line(ids: Path, extra: dict, expected: str) -> None:
    with pytest.raises((ConfigError, DataError), match=expected):
        build_datasets(shard_config(ids, **extra), 16)


def test_shards_without_a_manifest_are_counted_and_need_class_names(ids: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    out.mkdir()
    for f in (ids / "shards").glob("train-*.tar"):
        (out / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="no classes.txt, classes.json or manifest.json beside the shards"):
        open_shards(str(out / "train-{000000..000004}.tar"), True, 0, False)
    (out / "classes.json").write_text(json.dumps({"ant": 0, "bee": 1, "cat": 2}))
    stream = open_shards(str(out / "train-{000000..000004}.tar"), True, 0, False)
    assert stream.counts == [7, 7, 7, 7, 2] and stream.classes == list(CLASSES)


def test_bad_file_lists_and_hf_paths_are_one_line(ids: Path, tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("folder/train/ant/0.png,ant\n")
    (tmp_path / "v.csv").write_text("folder/val/ant/0.png,wasp\n")
    with pytest.raises(DataError, match="has label 'wasp', which no training row has"):
        load_filelist(tmp_path / "t.csv", tmp_path / "v.csv")
    (tmp_path / "broken.csv").write_text("just-a-path\n")
    with pytest.raises(DataError, match="broken.csv row 1: expected rows of path,label"):
        load_filelist(tmp_path / "broken.csv", None)
    pytest.importorskip("datasets")
    offline = "data.path=nobody/nothing is no local file or folder, and the Hugging Face hub cannot be reached"
    with pytest.raises(DataError, match=f"{offline}|cannot load a hub data set .* data.path=nobody/nothing"):
        load_hf("nobody/nothing", "train", None, "image", "label")  # offline here: the first message


def test_num_workers_auto_uses_the_cores_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert DataConfig().workers == min(16, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert DataConfig().workers == min(16, cores // 2)
    assert DataConfig(num_workers=3).workers == 3
    with pytest.raises(ConfigError, match="data.num_workers must be auto or an integer >= 0"):
        DataConfig(num_workers="many")


def test_pre_resized_shards_store_upright_images_at_the_shorter_side(tmp_path: Path) -> None:
    """make_shards --resize S: every stored image has its shorter side S (never enlarged), upright: a photo stored
    sideways with an EXIF orientation tag comes out as the viewer shows it; the manifest says the size."""
    import io
    import tarfile

    from PIL import Image

    photos = write_photo_folder(tmp_path / "photos", train=2, val=1, size=(50, 38))
    sideways = Image.new("RGB", (38, 50))  # portrait pixels, stored as a camera does: rotated, with the tag
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to view
    first = sorted((photos / "train").rglob("*.jpg"))[0]
    sideways.save(first, exif=exif.tobytes())
    manifest = make_shards(photos, tmp_path / "shards", per_shard=4, resize=20)
    assert manifest["resized"] == 20
    sizes = {}
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                        sizes[member.name] = image.size
                        assert 0x0112 not in image.getexif() or image.getexif()[0x0112] == 1
    assert all(min(size) == 20 for size in sizes.values()) and len(sizes) == 3 * 3
    assert sorted(set(sizes.values())) == [(26, 20)]  # 50x38 -> 26x20; the sideways 38x50 upright: 50x38 -> 26x20
