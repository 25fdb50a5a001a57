"""The decode-once image cache and JPEG decoding on the device: the same images as the per-image path, a cache
rebuilt when a file changes and reused when nothing does, one line for bad input; every sample once per epoch
under torchrun (shards and cache); and each new format trains end to end from the command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from formats import CLASSES, image_ids, make_shards, write_id_folder, write_photo_folder

from vitrain.data import build_datasets, build_loaders, cpu_eval_loader
from vitrain.data import cache as cache_module
from vitrain.data.cache import build_cache, cache_folder
from vitrain.data.config import DataConfig
from vitrain.errors import ConfigError, DataError

FLAT = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], hflip=False, crop_padding=0, batch_size=4, num_workers=0)
CPU = torch.device("cpu")


@pytest.fixture
def ids(tmp_path: Path) -> Path:
    return write_id_folder(tmp_path / "ids")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("extra", [dict(cache=True), dict(decode="device", train_crop="rrc"), dict(decode="device")])
def test_cached_and_device_decoded_batches_hold_every_image_once(ids: Path, extra: dict) -> None:
    cfg = DataConfig(name="imagefolder", root=str(ids), **FLAT, **extra)
    train, val, test = build_loaders(build_datasets(cfg, 16), cfg, 16, CPU, seed=0)
    pairs = [(i, int(y)) for x, labels in train for i, y in zip(image_ids(x), labels, strict=True)]
    assert sorted(i for i, _ in pairs) == list(range(30)) and test is None
    assert all(y == i // 10 for i, y in pairs)  # image k of train/ is in class k // 10
    assert sorted(i for x, _ in val for i in image_ids(x)) == list(range(30, 39))


@pytest.mark.parametrize(("extra", "tolerance"), [(dict(cache=True), 1e-6), (dict(decode="device", train_crop="rrc"),
                                                                              0.03)])
def test_evaluation_images_equal_the_per_image_path(photos: Path, extra: dict, tolerance: float) -> None:
    """Cache: PIL's resize and center crop of the same file, so equal; device decoding: libjpeg through
    torchvision and a tensor resize, so equal up to rounding (mean |diff| in [0, 1] pixel units)."""
    cfg = DataConfig(name="imagefolder", root=str(photos), crop_pct=0.875, **FLAT, **extra)
    splits = build_datasets(cfg, 24)
    _, val, _ = build_loaders(splits, cfg, 24, CPU, seed=0)
    fast, reference = (torch.cat([x for x, _ in loader]) for loader in (val, cpu_eval_loader(splits.val, 4)))
    assert fast.shape == reference.shape == (6, 3, 24, 24)
    assert (fast - reference).abs().mean() <= tolerance


def test_the_cache_is_reused_when_nothing_changes_and_rebuilt_when_a_file_does(
        ids: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = [(str(p), 0) for p in sorted((ids / "train").rglob("*.png"))]
    first = build_cache(samples, 16, "bilinear", tmp_path / "cache", workers=2)
    stamp = first.path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="vitrain.data.cache"):
        again = build_cache(samples, 16, "bilinear", tmp_path / "cache", workers=2)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp and "reusing" in caplog.text
    changed = Path(samples[3][0])
    changed.write_bytes((ids / "val/ant/0.png").read_bytes())  # another image under the same name
    rebuilt = build_cache(samples, 16, "bilinear", tmp_path / "cache", workers=1)
    assert rebuilt.path != first.path and not first.path.exists()  # no stale cache left behind
    assert image_ids(rebuilt.read(torch.tensor([3])).float() / 255) == [30]
    os.utime(changed, ns=(stamp, stamp))  # the modification time alone also counts
    assert build_cache(samples, 16, "bilinear", tmp_path / "cache", workers=1).path != rebuilt.path
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]


def test_an_unreadable_image_stops_the_cache_build_with_its_name(ids: Path, tmp_path: Path) -> None:
    broken = ids / "train/bee/4.png"
    broken.write_bytes(b"not a png")
    samples = [(str(p), 0) for p in sorted((ids / "train").rglob("*.png"))]
    with pytest.raises(DataError, match=r"cannot read image .*train/bee/4.png .* remove or replace the file"):
        build_cache(samples, 16, "bilinear", tmp_path / "cache", workers=2)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial cache


def test_the_cache_folder_is_beside_the_data_or_in_the_user_cache(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_folder(None, tmp_path / "data") == tmp_path / "data/.vitrain-cache"
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="cannot write the image cache to data.cache_dir=.*choose a writable folder"):
        cache_folder(str(tmp_path / "file/sub"), tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    writable = cache_module._writable
    monkeypatch.setattr(cache_module, "_writable", lambda f: "data" not in f.parts and writable(f))
    assert cache_folder(None, tmp_path / "data").parent == tmp_path / "user/vitrain"  # the data's folder: read-only


def test_batched_paths_refuse_per_image_policies_in_one_line(ids: Path) -> None:
    cfg = DataConfig(name="imagefolder", root=str(ids), cache=True, auto_augment="rand-m9-mstd0.5", **FLAT)
    with pytest.raises(ConfigError, match="data.cache=true augments whole batches and does not run RandAugment"):
        build_loaders(build_datasets(cfg, 16), cfg, 16, CPU, seed=0)
    with pytest.raises(ConfigError, match="read image files .* not digits"):
        DataConfig(cache=True)


RANKS_SCRIPT = """
import json, sys, torch
from vitrain.distributed import init_distributed, close_distributed
from vitrain.data import build_datasets, build_loaders
from vitrain.data.config import DataConfig
sys.path.insert(0, {tests!r})
from formats import image_ids
world, device = init_distributed("cpu", "gloo")
seen = {{}}
for name, extra in {configs!r}.items():
    cfg = DataConfig(**extra)
    train, val, _ = build_loaders(build_datasets(cfg, 16), cfg, 16, device, 0, world)
    train.sampler.set_epoch(1)
    seen[name] = dict(train=[i for x, _ in train for i in image_ids(x)], val=[i for x, _ in val for i in image_ids(x)])
json.dump(seen, open(f"{{sys.argv[1]}}/rank{{world.rank}}.json", "w"))
close_distributed()
"""


def test_two_processes_under_torchrun_see_every_sample_once(ids: Path, tmp_path: Path) -> None:
    make_shards(ids, tmp_path / "shards", per_shard=7)
    configs = {"shards": dict(name="webdataset", shards=str(tmp_path / "shards/train-{000000..000004}.tar"),
                              val_shards=str(tmp_path / "shards/val-{000000..000001}.tar"), **FLAT),
               "cache": dict(name="imagefolder", root=str(ids), cache=True, **FLAT)}
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(tests=str(Path(__file__).parent), configs=configs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
                             str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in configs:
        train = ranks[0][name]["train"] + ranks[1][name]["train"]
        assert len(ranks[0][name]["train"]) == len(ranks[1][name]["train"]) == 15, name
        assert sorted(train) == list(range(30)), name
        assert sorted(ranks[0][name]["val"] + ranks[1][name]["val"]) == list(range(30, 39)), name


def train_cli(args: list[str], run: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "vitrain.train", *args, "trainer.epochs=2", "data.batch_size=8",
                             "trainer.progress=false", f"hydra.run.dir={run}"], capture_output=True, text=True,
                            timeout=300, cwd=run.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_each_new_format_trains_from_the_command_line_and_its_checkpoint_evaluates(photos: Path,
                                                                                   tmp_path: Path) -> None:
    """data=webdataset, data=hf and data=imagefolder data.cache=true: two epochs of the default model on 18
    JPEGs, checkpoints written, and evaluate scores best.pt on the same validation images."""
    datasets = pytest.importorskip("datasets")
    from vitrain.evaluate import evaluate_checkpoint

    make_shards(photos, tmp_path / "shards", per_shard=5)
    table = datasets.load_dataset("imagefolder", data_dir=str(photos))
    table.save_to_disk(str(tmp_path / "hf"))
    runs = {"webdataset": ["data=webdataset", f"data.shards='{tmp_path}/shards/train-{{000000..000003}}.tar'",
                           f"data.val_shards='{tmp_path}/shards/val-{{000000..000001}}.tar'"],  # braces: quoted
            "hf": ["data=hf", f"data.path={tmp_path}/hf"],
            "cache": ["data=imagefolder", f"data.root={photos}", "data.cache=true", f"data.cache_dir={tmp_path}/c"]}
    for name, args in runs.items():
        metrics = train_cli(args, tmp_path / name)
        assert metrics["epochs"] == 2 and 0 <= metrics["final_top1"] <= 100, name
        result = evaluate_checkpoint(tmp_path / name / "checkpoints/best.pt", device="cpu")
        assert result["class_names"] == list(CLASSES) and result["model"]["images"] == 6, name
        if name != "cache":  # the same images through the same transform: the same score as in training
            assert result["model"]["top1"] == pytest.approx(metrics["best_top1"], abs=1e-6), name


def test_skipped_corrupt_samples_are_counted_in_tensorboard(photos: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_shards(photos, tmp_path / "shards", per_shard=5)
    shard = tmp_path / "shards/train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside its first image: the shard's 5 samples are lost
    train_cli(["data=webdataset", f"data.shards='{tmp_path}/shards/train-{{000000..000003}}.tar'",
               f"data.val_shards='{tmp_path}/shards/val-{{000000..000001}}.tar'", "data.skip_corrupt=true"],
              tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run/tb"))
    events.Reload()
    counts = [e.value for e in events.Scalars("data/skipped_corrupt")]
    assert counts == [5.0, 10.0]  # per epoch, cumulative


def test_a_corrupt_jpeg_decoded_on_the_device_is_one_line_naming_it(photos: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(photos / "train", folder)
    (folder / "bee/3.jpg").write_bytes(b"\xff\xd8\xff not a jpeg after all")
    cfg = DataConfig(name="imagefolder", root=str(folder), val_fraction=0.2, decode="device", train_crop="rrc",
                     **FLAT)
    train, val, _ = build_loaders(build_datasets(cfg, 16), cfg, 16, CPU, seed=0)
    with pytest.raises(DataError, match=r"cannot decode image .*bee/3.jpg \(RuntimeError\); remove or replace"):
        list(train) + list(val)  # in one of them


def test_the_batched_cpu_crop_is_torchvisions_resized_crop_of_the_drawn_boxes() -> None:
    """On the CPU the batched random-resized crop resizes each drawn box as torchvision's RandomResizedCrop
    does (antialiased uint8 kernel), flips the drawn ones, and leaves the training's RNG alone."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from vitrain.data.gpu import GpuAugment

    images = torch.randint(0, 256, (6, 3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = GpuAugment(16, (0.0,) * 3, (1.0,) * 3, True, train_crop="rrc")
    state = torch.get_rng_state()
    out = augment.crop(images, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(5)
    boxes = [v.tolist() for v in augment.rrc_boxes(6, 40, 30, g, CPU)]
    flips = (torch.rand(6, generator=g) < 0.5).tolist()
    for i, (top, left, height, width) in enumerate(zip(*boxes, strict=True)):
        crop = TF.resized_crop(images[i], top, left, height, width, [16, 16], InterpolationMode.BILINEAR,
                               antialias=True)
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)
    assert 0 < sum(flips) < 6
