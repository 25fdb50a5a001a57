"""The ``data`` part of scripts/benchmark.py. In memory: per-image transforms in loader workers vs batched
augmentation on the device (32x32 images to 224). On an image folder: images per second delivered to the training
step at 224 (random-resized crop, flip, normalize), one epoch per round, from vitrain's own loaders.

    python scripts/_bench_data.py [--root outputs/bench-folder] [--images 2000] [--workers 2] [--rounds 2]

Contenders, on the same generated folder of ImageNet-sized JPEGs (500x375, quality 90, 10 classes):
ImageFolder + PIL in loader workers (``data=imagefolder``), WebDataset shards + PIL in loader workers
(``data=webdataset``, shards of 250 made by scripts/make_shards.py; the same pre-resized to a shorter side of 256
with ``--resize 256``, from disk and from a loopback ``http.server``), the decode-once cache with batched
augmentation (``data.cache=true``), and on CUDA, JPEG decoding on the device (``data.decode=device``).
Also: the time to build the cache, its size on disk, and the peak resident memory of a process that reads
one epoch through each contender (a fresh process per contender, so that the figures do not mix).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _bench_utils import interleave, pair_row, synchronize
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from vitrain.data import EpochSampler
from vitrain.data.datasets import ArrayDataset
from vitrain.data.transforms import build_transforms

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))


def epoch_seconds(loader: object, device: torch.device) -> float:
    """Seconds to draw every batch of ``loader`` onto ``device``, from creating the iterator to the last batch."""
    synchronize(device)
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    synchronize(device)
    return time.perf_counter() - start


def bench_data(device: torch.device, batch_size: int, batches: int, rounds: int, workers: int,
               img_size: int = 224) -> dict:
    """Images/s of the classic path (vitrain's train transforms per image, ``workers`` DataLoader processes)
    and of the device-resident path (``vitrain.data.gpu``), both from the same random 32x32 uint8 images:
    resize to ``img_size`` (bilinear), random crop with 4-pixel padding, flip, float, normalize."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch_size * batches, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=batch_size * batches)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    dataset = ArrayDataset(images, labels, build_transforms(img_size, mean, std, train=True))
    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    contenders = {f"workers ({workers})": partial(epoch_seconds, loader, device)}
    try:
        from vitrain.data.gpu import DeviceLoader, GpuAugment
    except ImportError:
        times = interleave(contenders, rounds)
        return {"part": "data", "model": f"32->{img_size} uint8", "a": None, "b": next(iter(times)),
                "b_img_s": len(dataset) / statistics.median(*times.values()), "seconds": times,
                "items": len(dataset), "note": "vitrain.data.gpu not found: device path not measured"}
    augment = GpuAugment(img_size, mean, std, train=True)
    device_loader = DeviceLoader(dataset.images, dataset.labels, batch_size, augment, EpochSampler(len(dataset)),
                                 device=str(device))
    contenders = {"device path": partial(epoch_seconds, device_loader, device), **contenders}
    return pair_row("data", f"32->{img_size} uint8", interleave(contenders, rounds), len(dataset))


def make_jpeg_folder(root: Path, images: int = 2000, size: tuple[int, int] = (500, 375), classes: int = 10) -> Path:
    """``root/train/<class>/*.jpg`` (and a small ``val/``): smooth multi-scale noise with fine grain, so that
    decoding costs what it costs for photographs of that size. Kept when it is already there."""
    done = root / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"images": images, "size": list(size)}:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", max(classes, images // 20))):
        for k in range(n):
            folder = root / split / f"class{k % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            canvas = np.zeros((size[1], size[0], 3), np.float32)
            for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
                low = Image.fromarray(rng.integers(0, 256, (cells * 3 // 4, cells, 3), np.uint8))
                canvas += weight * np.asarray(low.resize(size, Image.BICUBIC), np.float32)
            canvas += rng.normal(0, 6, canvas.shape)
            Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(folder / f"{k:05d}.jpg", quality=90)
    done.write_text(json.dumps({"images": images, "size": list(size)}))
    return root


def data_config(kind: str, root: Path, batch_size: int, workers: int) -> object:
    from vitrain.data.config import DataConfig

    common = dict(train_crop="rrc", crop_pct=0.875, interpolation="bilinear", batch_size=batch_size,
                  num_workers=workers, crop_padding=0)
    if kind.startswith("webdataset"):  # webdataset: as stored; "256": pre-resized; "http": those over loopback
        folder = root / ("shards" if kind == "webdataset" else "shards-256")
        names = [s["name"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]
        train, val = (sum(n.startswith(f"{split}-") for n in names) - 1 for split in ("train", "val"))
        base = (root / "http-url").read_text().strip() if kind.endswith("http") else str(folder)
        return DataConfig(name="webdataset", shards=f"{base}/train-{{000000..{train:06d}}}.tar",
                          val_shards=f"{base}/val-{{000000..{val:06d}}}.tar", **common)
    extra = {"cache": True, "cache_dir": str(root / "cache")} if kind == "cache" else {}
    if kind == "device decode":
        extra = {"decode": "device"}
    return DataConfig(name="imagefolder", root=str(root), **extra, **common)


def train_loader(kind: str, root: Path, batch_size: int, workers: int, device: torch.device) -> object:
    from vitrain.data import build_datasets, build_loaders

    cfg = data_config(kind, root, batch_size, workers)
    return build_loaders(build_datasets(cfg, 224), cfg, 224, device, seed=0)[0]


def epoch_rate(loader: object, device: torch.device, epoch: int) -> float:
    """Images per second of one epoch of ``loader``, each batch moved to ``device`` as the trainer does."""
    loader.sampler.set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS), or its peak (VmHWM), in MiB. Not ``ru_maxrss``: that one
    keeps the peak of the process this one was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_process(kind: str, root: Path, batch_size: int, workers: int, device: str) -> dict:
    """In a fresh process: resident memory after the loader is built, and its peak over one epoch."""
    out = subprocess.run([sys.executable, __file__, "--rss", kind, "--root", str(root), "--batch-size",
                          str(batch_size), "--workers", str(workers), "--device", device],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_folder(device: torch.device, root: Path, images: int, batch_size: int, workers: int, rounds: int) -> dict:
    """Images/s per contender (median of ``rounds`` epochs after a warm-up epoch, contenders interleaved),
    the cache's build time and size, and each contender's resident memory."""
    from make_shards import make_shards

    from vitrain.data.cache import build_cache, cache_side
    from vitrain.data.datasets import load_imagefolder

    make_jpeg_folder(root, images)
    if not (root / "shards/manifest.json").is_file():
        make_shards(root, root / "shards", per_shard=250)
    if not (root / "shards-256/manifest.json").is_file():
        make_shards(root, root / "shards-256", per_shard=250, resize=256)
    server = serve(root / "shards-256", root / "http-url")
    shutil.rmtree(root / "cache", ignore_errors=True)
    start = time.perf_counter()
    cache = build_cache(load_imagefolder(root)[0].samples, cache_side(224, 0.875), "bilinear", root / "cache",
                        workers)
    build_seconds = time.perf_counter() - start
    kinds = ["imagefolder", "webdataset", "webdataset 256", "webdataset 256 http", "cache"] + (
        ["device decode"] if device.type == "cuda" else [])
    loaders = {k: train_loader(k, root, batch_size, workers, device) for k in kinds}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(1 + rounds):
        for k in kinds if r % 2 == 0 else kinds[::-1]:
            rate = epoch_rate(loaders[k], device, r)
            if r > 0:
                rates[k].append(rate)
    memory = {k: one_process(k, root, batch_size, workers, device.type) for k in kinds}
    stages = per_image_ms(root)
    server.kill()
    server.wait()
    return {"images": images, "batch_size": batch_size, "workers": workers, "rounds": rounds,
            "images_per_sec": {k: float(np.median(v)) for k, v in rates.items()}, "all_rates": rates,
            "cache_build_seconds": build_seconds, "cache_bytes": cache.path.stat().st_size,
            "folder_bytes": sum(p.stat().st_size for p in (root / "train").rglob("*.jpg")), "memory_mb": memory,
            "per_image_ms": stages}


def per_image_ms(root: Path, count: int = 200, reps: int = 3) -> dict[str, dict[str, float]]:
    """Milliseconds per image in one thread (best of ``reps`` passes over ``count`` images), stage by stage, for
    the JPEGs as stored in the folder and as pre-resized in ``shards-256``: reading the bytes (a file each, or the
    tar members of a shard), decoding (PIL, EXIF orientation applied, RGB), and the training transform (random
    resized crop to 224, flip, normalize)."""
    import io

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from vitrain.data.sources import upright

    transform = build_transforms(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, train=True, train_crop="rrc")
    files = sorted((root / "train").rglob("*.jpg"))[:count]
    shard = sorted((root / "shards-256").glob("train-*.tar"))[0]

    def read_folder() -> list[bytes]:
        return [f.read_bytes() for f in files]

    def read_shard() -> list[bytes]:
        with open(shard, "rb") as stream:
            return [s["jpg"] for s in group_by_keys(tar_file_expander([{"stream": stream, "url": str(shard)}]))]

    def best(fn: object, items: list) -> tuple[float, list]:
        times, out = [], []
        for _ in range(reps):
            start = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - start) * 1000 / len(items))
        return min(times), out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}
    for name, read in (("folder", read_folder), ("pre-resized shards", read_shard)):
        read_ms, blobs = best(read, files)
        decode_ms, images = best(lambda b=blobs: [upright(Image.open(io.BytesIO(x))).convert("RGB") for x in b],
                                 blobs)
        transform_ms, _ = best(lambda i=images: [transform(x) for x in i], images)
        result[name] = {"read": read_ms, "decode": decode_ms, "transform": transform_ms,
                        "total": read_ms + decode_ms + transform_ms, "size": list(images[0].size)}
    torch.set_num_threads(threads)
    return result


def serve(folder: Path, url_file: Path) -> subprocess.Popen:
    """Python's http.server over ``folder`` on a free loopback port; its URL written to ``url_file`` (for the
    one-process memory runs). The caller stops it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    url_file.write_text(f"http://127.0.0.1:{port}")
    return server


def format_folder(result: dict) -> str:
    rates = result["images_per_sec"]
    base = rates["imagefolder"]
    lines = [f"| loader ({result['images']} JPEGs 500x375 -> 224, batch {result['batch_size']}, "
             f"{result['workers']} workers) | img/s | vs ImageFolder | RSS after build / peak (MiB) |",
             "| --- | --- | --- | --- |"]
    for kind, rate in rates.items():
        m = result["memory_mb"][kind]
        lines.append(f"| {kind} | {rate:.0f} | {rate / base:.2f}x | {m['built']:.0f} / {m['peak']:.0f} |")
    lines.append(f"\ncache: built in {result['cache_build_seconds']:.1f} s, {result['cache_bytes'] / 2**20:.0f} MiB "
                 f"on disk (the JPEGs: {result['folder_bytes'] / 2**20:.0f} MiB)")
    lines += ["", "| one thread, ms per image | read | decode | train transform | total |",
              "| --- | --- | --- | --- | --- |"]
    for name, ms in result["per_image_ms"].items():
        lines.append(f"| {name} ({ms['size'][0]}x{ms['size'][1]}) | {ms['read']:.2f} | {ms['decode']:.2f} | "
                     f"{ms['transform']:.2f} | {ms['total']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("outputs/bench-folder"), help="where the folder is generated")
    p.add_argument("--images", type=int, default=2000, help="training images in the generated folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (and cache-building processes)")
    p.add_argument("--rounds", type=int, default=2, help="recorded epochs per contender, after one warm-up epoch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmark_data.json"))
    p.add_argument("--rss", help=argparse.SUPPRESS)  # internal: one epoch of one contender, in this process
    args = p.parse_args()
    device = torch.device(args.device)
    if args.rss:
        loader = train_loader(args.rss, args.root, args.batch_size, args.workers, device)
        built = rss_mb()
        epoch_rate(loader, device, 0)
        print(json.dumps({"built": built, "peak": rss_mb("VmHWM")}))
        return
    result = bench_folder(device, args.root, args.images, args.batch_size, args.workers, args.rounds)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_folder(result))


if __name__ == "__main__":
    main()
