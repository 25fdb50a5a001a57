"""Write WebDataset shards from an image folder, for ``data=webdataset``.

    python scripts/make_shards.py DIR OUT [--per-shard 1000] [--resize 256]

DIR is an image folder as ``data=imagefolder`` reads it: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``
(each split becomes ``OUT/<split>-000000.tar``, ...), or one folder ``DIR/<class>/*`` (``OUT/train-*.tar``).
Each sample is ``<key>.<jpg|png|webp>`` (the file's bytes, not re-encoded) and ``<key>.cls`` (the class
index); the training samples are shuffled (``--seed``) before they are cut into shards, so that reading a
few shards at a time still mixes the classes. Beside the shards: ``classes.txt`` (one class name per line)
and ``manifest.json`` (the classes, and each shard's sample count, which makes an epoch exact).

``--resize S`` stores each image turned upright (its EXIF orientation) and resized so that its shorter side is S
(never enlarged; JPEG quality 95, PNG and WebP lossless): a random-resized crop to 224 then decodes and crops a
256-pixel image instead of a photo of several megapixels, which makes loading several times faster (docs/data.md).
Choose S at least the training size divided by the eval crop (224 / 0.875 = 256).

    python -m vitrain.train data=webdataset data.shards='OUT/train-{000000..000009}.tar' \\
        data.val_shards='OUT/val-{000000..000001}.tar'
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tqdm import tqdm

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def folder_samples(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, class index) of every image in ``folder/<class>/``, and the sorted class names."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).rglob("*"))
               if f.suffix.lower() in EXTENSIONS]
    return samples, classes


def resized_bytes(path: Path, side: int) -> bytes:
    """The image at ``path``, upright, its shorter side at most ``side`` (antialiased), re-encoded in its format."""
    import io

    from PIL import Image

    from vitrain.data.sources import upright

    with Image.open(path) as image:
        image = upright(image).convert("RGB")
        scale = side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC,
                                 reducing_gap=3.0)
        out = io.BytesIO()
        kind = EXTENSIONS[path.suffix.lower()]
        image.save(out, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[kind],
                   **({"quality": 95} if kind == "jpg" else {"lossless": True} if kind == "webp" else {}))
        return out.getvalue()


def write_shards(samples: list[tuple[Path, int]], out: Path, split: str, per_shard: int,
                 resize: int | None = None) -> list[dict]:
    """Tar shards of ``per_shard`` samples each (images resized to shorter side ``resize``); returns the manifest
    entries (name, count)."""
    import webdataset as wds

    entries = []
    for start in tqdm(range(0, len(samples), per_shard), desc=f"{split} shards", unit="shard"):
        name = f"{split}-{start // per_shard:06d}.tar"
        chunk = samples[start : start + per_shard]
        with wds.TarWriter(str(out / name)) as sink:
            for k, (path, label) in enumerate(chunk, start=start):
                data = resized_bytes(path, resize) if resize else path.read_bytes()
                sink.write({"__key__": f"{split}{k:08d}", EXTENSIONS[path.suffix.lower()]: data, "cls": str(label)})
        entries.append({"name": name, "count": len(chunk)})
    return entries


def make_shards(source: Path, out: Path, per_shard: int = 1000, seed: int = 0, resize: int | None = None) -> dict:
    """Shards of every split of ``source`` in ``out``, with ``classes.txt`` and ``manifest.json``; ``resize``:
    images stored with their shorter side at most that many pixels."""
    splits = [s for s in ("train", "val") if (source / s).is_dir()] or [""]
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"classes": None, "shards": [], **({"resized": resize} if resize else {})}
    for split in splits:
        samples, classes = folder_samples(source / split if split else source)
        if not samples:
            raise SystemExit(f"error: no images under {source / split} (expected <class>/<image files>)")
        if manifest["classes"] not in (None, classes):
            raise SystemExit(f"error: the class folders of {split}/ differ from train/'s")
        manifest["classes"] = classes
        if split in ("train", ""):
            random.Random(seed).shuffle(samples)
        manifest["shards"] += write_shards(samples, out, split or "train", per_shard, resize)
    (out / "classes.txt").write_text("\n".join(manifest["classes"]) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="image folder: <class>/* or train/<class>/* and val/<class>/*")
    parser.add_argument("out", type=Path, help="folder for the shards, classes.txt and manifest.json")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples' shuffle")
    parser.add_argument("--resize", type=int, default=None, metavar="S",
                        help="store images upright with their shorter side at most S pixels (e.g. 256)")
    args = parser.parse_args()
    if args.resize is not None and args.resize <= 0:
        raise SystemExit(f"error: --resize must be positive, got {args.resize}")
    manifest = make_shards(args.source, args.out, args.per_shard, args.seed, args.resize)
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["name"].startswith(split)]
        if shards:
            print(f"{split}: {sum(s['count'] for s in shards)} samples in {len(shards)} shards: "
                  f"{args.out}/{split}-{{000000..{len(shards) - 1:06d}}}.tar")


if __name__ == "__main__":
    main()
