"""EXIF orientation: a photo stored sideways with the tag that turns it upright (as phones store portrait photos)
reaches the model upright on every path that reads image files, and a model trained on upright images predicts
its upright content."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vitrain.data.cache import build_cache
from vitrain.data.datasets import load_imagefolder
from vitrain.data.decode import decode_batch, orient, take_orientation
from vitrain.data.shards import ShardStream
from vitrain.data.sources import HFImages, load_filelist, open_rgb

# the transpose that stores upright content so that EXIF orientation k shows it upright again (the inverse of
# the one exif_transpose applies)
STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}
CPU = torch.device("cpu")


def photo(width: int = 24, height: int = 32, bright: str = "top", seed: int = 0) -> np.ndarray:
    """An upright (height, width, 3) uint8 picture: one half bright (``top``, ``bottom``, ``left``, ``right``),
    the other dark, with noise, so that any turn or flip changes it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(20, 60, size=(height, width, 3)).astype(np.uint8)
    half = {"top": np.s_[: height // 2], "bottom": np.s_[height // 2:], "left": np.s_[:, : width // 2],
            "right": np.s_[:, width // 2:]}[bright]
    pixels[half] += 170
    return pixels


def encode(pixels: np.ndarray, orientation: int = 1, fmt: str = "PNG", endian: str = "<") -> bytes:
    """``pixels`` (upright) stored as EXIF ``orientation`` says a camera stores them, with the tag."""
    image = Image.fromarray(pixels)
    image = image if orientation == 1 else image.transpose(STORE[orientation])
    exif = Image.Exif()
    exif.endian = endian
    exif[0x010F] = "vitrain test camera"  # Make: an entry before Orientation
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``upright.png``, ``sideways6.png`` and ``sideways8.png`` (the same picture stored turned, tagged 6 and 8),
    and ``sideways6.jpg``, in one class folder ``photos/a``."""
    folder = tmp_path_factory.mktemp("orientation") / "photos" / "a"
    folder.mkdir(parents=True)
    written = {"upright": encode(photo()), "sideways6": encode(photo(), 6), "sideways8": encode(photo(), 8)}
    paths = {}
    for name, data in written.items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(data)
    paths["jpeg6"] = folder / "sideways6.jpg"
    paths["jpeg6"].write_bytes(encode(photo(), 6, "JPEG"))
    return paths


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_a_tensor_as_pils_exif_transpose(orientation: int) -> None:
    stored = Image.open(io.BytesIO(encode(photo(width=5, height=7), orientation)))
    expected = rgb(ImageOps.exif_transpose(stored))
    tensor = torch.from_numpy(np.asarray(stored.convert("RGB")).copy()).permute(2, 0, 1)
    assert np.array_equal(orient(tensor, orientation).permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(expected, photo(width=5, height=7))  # and that is the upright picture


@pytest.mark.parametrize("endian", ["<", ">"])
def test_take_orientation_reads_the_tag_and_sets_it_to_1(endian: str) -> None:
    for orientation in range(1, 9):
        data = bytearray(encode(photo(), orientation, "JPEG", endian))
        assert Image.open(io.BytesIO(bytes(data))).getexif()[0x0112] == orientation
        assert take_orientation(data) == orientation
        tags = Image.open(io.BytesIO(bytes(data))).getexif()
        assert tags[0x0112] == 1 and tags[0x010F] == "vitrain test camera"  # only the orientation changed
    plain = io.BytesIO()
    Image.fromarray(photo()).save(plain, "JPEG")
    untouched = bytearray(plain.getvalue())
    assert take_orientation(untouched) == 1 and untouched == plain.getvalue()
    assert take_orientation(bytearray(b"\xff\xd8\xff not a jpeg after all")) == 1


def test_open_rgb_turns_the_photo_upright(files: dict[str, Path]) -> None:
    """predict's and visualize's reader, and the image folders' loader."""
    upright = rgb(open_rgb(files["upright"]))
    assert np.array_equal(upright, photo())
    for name in ("sideways6", "sideways8"):
        assert Image.open(files[name]).size == (32, 24)  # stored sideways
        assert np.array_equal(rgb(open_rgb(files[name])), upright), name
    jpeg = rgb(open_rgb(files["jpeg6"])).astype(int)  # JPEG: close to the picture, not equal
    assert jpeg.shape == upright.shape and jpeg[:16].mean() > jpeg[16:].mean() + 100


def test_image_folders_and_file_lists_read_the_photo_upright(files: dict[str, Path]) -> None:
    folder, _, _ = load_imagefolder(files["upright"].parent.parent)
    names = [Path(p).stem for p, _ in folder.samples]
    images = {name: rgb(folder.read(i)[0]) for i, name in enumerate(names)}
    assert np.array_equal(images["sideways6"], photo()) and np.array_equal(images["sideways8"], photo())
    listing = files["upright"].parent.parent / "list.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([[f"a/{files[n].name}", "a"] for n in ("upright", "sideways6", "sideways8")])
    rows, _, _ = load_filelist(listing, None)
    assert all(np.array_equal(rgb(rows.read(i)[0]), photo()) for i in range(3))


def test_the_decode_once_cache_holds_the_photo_upright(files: dict[str, Path], tmp_path: Path) -> None:
    samples = [(str(files[n]), 0) for n in ("upright", "sideways6", "sideways8")]
    cache = build_cache(samples, 16, "bilinear", tmp_path, workers=1)
    rows = cache.read(torch.arange(3))  # (3, 3, 16, 16)
    assert torch.equal(rows[1], rows[0]) and torch.equal(rows[2], rows[0])


def test_shards_read_the_photo_upright(files: dict[str, Path]) -> None:
    stream = ShardStream(["shard.tar"], [3], ["a"], train=False)
    for name in ("sideways6", "sideways8"):
        image, label = stream._decode({"__url__": "shard.tar", "__key__": name, "png": files[name].read_bytes(),
                                       "cls": b"0"})
        assert np.array_equal(rgb(image), photo()) and label == 0, name


def test_hugging_face_images_are_read_upright(files: dict[str, Path]) -> None:
    """Undecoded image bytes (``Image(decode=False)``, read by vitrain) and images that datasets decodes."""
    datasets = pytest.importorskip("datasets")
    rows = {"image": [{"bytes": files[n].read_bytes(), "path": None} for n in ("sideways6", "sideways8")],
            "label": [0, 0]}
    for decode in (False, True):
        features = datasets.Features({"image": datasets.Image(decode=decode),
                                      "label": datasets.ClassLabel(names=["a"])})
        table = datasets.Dataset.from_dict(rows, features=features)
        images = HFImages(table, "image", "label", ["a"])
        assert all(np.array_equal(rgb(images.read(i)[0]), photo()) for i in range(2)), f"decode={decode}"


def test_device_decoding_turns_the_photo_upright(files: dict[str, Path]) -> None:
    """data.decode=device: the JPEG decoded by TorchCodec (or torchvision) and turned as its tag says, the PNGs by
    PIL; the same pixels as PIL's upright decoding of the same files."""
    names = ["jpeg6", "sideways6", "sideways8", "upright"]
    decoded = decode_batch([files[n].read_bytes() for n in names], [str(files[n]) for n in names], CPU)
    for name, image in zip(names, decoded, strict=True):
        assert image.shape == (3, 32, 24), name
        reference = rgb(open_rgb(files[name]))
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 1, name


@pytest.mark.gpu
def test_nvjpeg_decoding_turns_the_photo_upright() -> None:
    """On CUDA (nvJPEG, which does not apply the tag itself): every orientation comes out upright."""
    for orientation in range(1, 9):
        data = encode(photo(), orientation, "JPEG")
        (image,) = decode_batch([data], [f"tagged{orientation}.jpg"], torch.device("cuda"))
        assert image.is_cuda and image.shape == (3, 32, 24), orientation
        pixels = image.cpu().permute(1, 2, 0).numpy().astype(int)
        reference = rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))  # libjpeg's decoding: close, not equal
        assert np.abs(pixels - reference).mean() < 3 and pixels[:16].mean() > pixels[16:].mean() + 100, orientation


CLASSES = ("bottom", "left", "right", "top")  # the bright half of the picture


@pytest.fixture(scope="module")
def halves_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-Nano trained on upright pictures whose class is their bright half (no flips), and its best.pt."""
    from vitrain.config import compose
    from vitrain.train import train

    root = tmp_path_factory.mktemp("halves")
    for split, n in (("train", 48), ("val", 4)):
        for c in CLASSES:
            (root / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(photo(24, 24, c, seed=i + (0 if split == "train" else 1000))).save(
                    root / "data" / split / c / f"{i}.png")
    metrics = train(compose(["data=imagefolder", f"data.root={root}/data", "data.hflip=false", "trainer.epochs=6",
                             "trainer.progress=false", "data.batch_size=16", "data.num_workers=0", "optimizer.lr=2e-3",
                             "scheduler.warmup_epochs=1"]), root / "run")  # 100% from the third epoch on
    assert metrics["best_top1"] == 100.0, metrics["history"]
    return root / "run" / "checkpoints" / "best.pt"


def test_predict_gives_the_upright_contents_class(halves_model: Path, tmp_path: Path) -> None:
    """Stored sideways, the "top" picture has its bright half on the left (tag 6) or right (tag 8): read without
    the tag, the model would answer left or right."""
    from vitrain.predict import predict

    (tmp_path / "in").mkdir()
    for orientation in (6, 8):
        (tmp_path / "in" / f"top{orientation}.jpg").write_bytes(encode(photo(24, 24, "top", seed=7), orientation,
                                                                       "JPEG"))
        stored = rgb(Image.open(tmp_path / "in" / f"top{orientation}.jpg"))
        left, right = stored[:, :12].mean(), stored[:, 12:].mean()
        assert (left - right if orientation == 6 else right - left) > 100  # what a reader ignoring the tag sees
    results = predict(halves_model, tmp_path / "in", topk=1, device="cpu")
    assert [r["top"][0]["class"] for r in results] == ["top", "top"], results

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cli = subprocess.run([sys.executable, "-m", "vitrain.predict", f"checkpoint={halves_model}",
                          f"inputs={tmp_path / 'in' / 'top6.jpg'}", "topk=1", "device=cpu"],
                         capture_output=True, text=True, timeout=300, cwd=cwd)
    assert cli.returncode == 0, cli.stderr
    assert f"{tmp_path / 'in' / 'top6.jpg'}: top " in cli.stdout
    written = halves_model.parent.parent / "predictions" / f"top6.{halves_model.name}.json"
    assert json.loads(written.read_text())["predictions"][0]["top"][0]["class"] == "top"
    assert list(cwd.iterdir()) == []  # nothing in the working folder


def test_evaluate_scores_sideways_photos_as_upright_ones(halves_model: Path, tmp_path: Path) -> None:
    """A validation folder of the same pictures stored sideways (tags 6 and 8) scores as the upright one."""
    from vitrain.data.config import DataConfig
    from vitrain.evaluate import evaluate_checkpoint

    for c in CLASSES:
        (tmp_path / "sideways" / "val" / c).mkdir(parents=True)
        (tmp_path / "sideways" / "train" / c).mkdir(parents=True)
        for i in range(4):
            pixels = photo(24, 24, c, seed=i + 1000)
            (tmp_path / "sideways" / "val" / c / f"{i}.jpg").write_bytes(encode(pixels, 6 + 2 * (i % 2), "JPEG"))
            (tmp_path / "sideways" / "train" / c / f"{i}.png").write_bytes(encode(pixels))
    result = evaluate_checkpoint(halves_model, DataConfig(name="imagefolder", root=str(tmp_path / "sideways")),
                                 device="cpu")
    assert result["model"]["top1"] == 100.0 and result["model"]["images"] == 16
