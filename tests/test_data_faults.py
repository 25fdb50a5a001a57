"""Faulty shards and images, written as real files: each fault is one line that names the file and what to
change, or (``data.skip_corrupt=true``) a warning and a run on what can be read."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from formats import make_shards, write_id_folder, write_photo_folder
from torchvision.transforms.v2.functional import pil_to_tensor

from vitrain.data.cache import build_cache
from vitrain.data.shards import ShardLoader, open_shards
from vitrain.errors import DataError, first_line


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of an id folder, 7 samples each (train 7,7,7,7,2; val 7,2), with classes.txt and manifest.json."""
    root = tmp_path_factory.mktemp("faults")
    make_shards(write_id_folder(root / "folder"), root / "shards", per_shard=7)
    return root / "shards"


def copy_shards(shards: Path, out: Path, manifest: bool) -> Path:
    out.mkdir()
    for f in shards.iterdir():
        if manifest or f.name != "manifest.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def truncate(shard: Path, size: int = 10_000) -> None:
    """Cut ``shard`` inside its third sample: the first two can be read."""
    shard.write_bytes(shard.read_bytes()[:size])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "<" not in message and "dict_keys" not in message, message
    return message


def test_a_truncated_shard_without_a_manifest_is_counted_as_far_as_it_can_be_read(
        shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = copy_shards(shards, tmp_path / "plain", manifest=False)
    truncate(plain / "train-000001.tar")
    spec = str(plain / "train-{000000..000004}.tar")
    with pytest.raises(DataError) as error:
        open_shards(spec, True, 0, skip_corrupt=False)
    assert one_line(error) == (
        f"shard {plain}/train-000001.tar is truncated or corrupt (ReadError: unexpected end of data after 2 "
        f"samples), found while counting the shards (they have no manifest.json); set data.skip_corrupt=true to "
        f"use the samples that can be read, or regenerate the shards with scripts/make_shards.py")
    with caplog.at_level(logging.WARNING, logger="vitrain.data.shard_index"):
        stream = open_shards(spec, True, 0, skip_corrupt=True)
    assert stream.counts == [7, 2, 7, 7, 2]
    assert f"shard {plain}/train-000001.tar is truncated or corrupt (ReadError: unexpected end of data): " \
           f"only its first 2 samples can be read, and are used" in caplog.text
    stream.transform = pil_to_tensor
    loader = ShardLoader(stream, 4, 2, seed=0, rank=0, world_size=1)
    assert sum(len(y) for _, y in loader) == 25 and loader.skipped == 0  # every readable sample, nothing filled


def test_a_truncated_shard_with_a_manifest_is_one_clean_line(shards: Path, tmp_path: Path) -> None:
    bad = copy_shards(shards, tmp_path / "bad", manifest=True)
    truncate(bad / "train-000001.tar", 5000)
    stream = open_shards(str(bad / "train-{000000..000004}.tar"), False, 0, False)
    stream.transform = pil_to_tensor
    with pytest.raises(DataError) as error:
        list(ShardLoader(stream, 4, 0, seed=0, rank=0, world_size=1))
    assert one_line(error) == (
        f"shard {bad}/train-000001.tar is truncated or corrupt (ReadError: empty header after 0 samples); "
        f"replace it (scripts/make_shards.py regenerates shards), or set data.skip_corrupt=true to skip what "
        f"cannot be read")


def test_a_shard_shorter_than_its_manifest_says_is_named(shards: Path, tmp_path: Path) -> None:
    bad = copy_shards(shards, tmp_path / "short", manifest=True)
    truncate(bad / "train-000001.tar", 20480)  # at a tar record's end: Python's tarfile sees a clean end
    stream = open_shards(str(bad / "train-000001.tar"), False, 0, False)
    stream.transform = pil_to_tensor
    with pytest.raises(DataError, match=r"train-000001.tar is truncated or corrupt \(it ends after 5 samples, "
                                        r"fewer than counted\); replace it"):
        list(ShardLoader(stream, 4, 0, seed=0, rank=0, world_size=1))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of ``members`` (name, bytes) in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def out_of_order(shards: Path, folder: Path) -> Path:
    """A shard whose members are a.png, b.png, a.cls, b.cls: webdataset groups a.png alone, without a label."""
    folder.mkdir()
    (folder / "classes.txt").write_text((shards / "classes.txt").read_text())
    with tarfile.open(shards / "train-000000.tar") as tar:
        png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    return write_tar(folder / "train-000000.tar", [("a.png", png), ("b.png", png), ("a.cls", b"0"),
                                                   ("b.cls", b"1")])


def test_members_out_of_order_say_a_sample_has_no_label_and_how_to_write_the_tar(shards: Path,
                                                                                 tmp_path: Path) -> None:
    shard = out_of_order(shards, tmp_path / "odd")
    stream = open_shards(str(shard), False, 0, False)
    stream.transform = pil_to_tensor
    with pytest.raises(DataError) as error:
        list(ShardLoader(stream, 4, 0, seed=0, rank=0, world_size=1))
    assert one_line(error) == (
        f"sample a in {shard} has no label (no .cls or .json member, only .png); the members of one sample must be "
        f"consecutive in the tar, as tar and webdataset's ShardWriter write them: create it with "
        f"`tar --sort=name` or scripts/make_shards.py")


def test_a_glob_is_not_expanded_and_the_brace_pattern_is_shown(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        open_shards(str(tmp_path / "train-*.tar"), True, 0, False)
    assert one_line(error) == (
        f"shard pattern '{tmp_path}/train-*.tar' is a glob: globs (*, ?, [...]) are not expanded here; write the "
        f"shards as a brace pattern, e.g. '{tmp_path}/train-{{000000..000009}}.tar' (in Hydra's quotes: "
        f"'data.shards=\"...\"')")
    with pytest.raises(DataError) as error:  # matching files are named as a pattern, not read
        open_shards(str(shards / "train-00000[0-24].tar"), True, 0, False)
    assert f"brace pattern, '{shards}/train-{{000000..000002}}.tar::{shards}/train-000004.tar' for the 4 files it " \
           f"matches here" in one_line(error)


@pytest.mark.parametrize(("content", "cause"), [
    (b"not a png", "cannot identify image file"),
    (None, "image file is truncated"),  # the first half of a real JPEG
])
def test_an_undecodable_image_stops_the_cache_build_with_the_decoders_reason(
        tmp_path: Path, content: bytes | None, cause: str) -> None:
    folder = write_photo_folder(tmp_path / "photos")
    broken = folder / "train/bee/1.jpg"
    broken.write_bytes(content or broken.read_bytes()[:1000])
    samples = [(str(p), 0) for p in sorted((folder / "train").rglob("*.jpg"))]
    with pytest.raises(DataError) as error:
        build_cache(samples, 16, "bilinear", tmp_path / "cache", workers=2)
    message = one_line(error)
    assert message.startswith(f"cannot read image {broken} ({cause}") and "(DataError)" not in message, message
    assert message.endswith("; remove or replace the file"), message


def run_train(args: list[str], run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitrain.train", "data=webdataset", *args, "trainer.epochs=1",
                           "scheduler.warmup_epochs=0", "data.batch_size=4", "trainer.progress=false",
                           f"hydra.run.dir={run}"],
                          capture_output=True, text=True, timeout=300, cwd=run.parent)


@pytest.mark.parametrize("fault", ["truncated", "out_of_order", "glob"])
def test_the_command_line_prints_one_error_line(shards: Path, tmp_path: Path, fault: str) -> None:
    val = f"data.val_shards='{shards}/val-{{000000..000001}}.tar'"
    if fault == "truncated":
        plain = copy_shards(shards, tmp_path / "plain", manifest=False)
        truncate(plain / "train-000001.tar")
        args, expected = [f"data.shards='{plain}/train-{{000000..000004}}.tar'", val], \
            f"error: shard {plain}/train-000001.tar is truncated or corrupt (ReadError: unexpected end of data"
    elif fault == "out_of_order":
        shard = out_of_order(shards, tmp_path / "odd")
        args, expected = [f"data.shards='{shard}'", val], "error: sample "  # a or b, without a label or an image
    else:
        args, expected = [f"data.shards='{shards}/train-*.tar'", val], f"error: shard pattern '{shards}/train-*.tar'"
    result = run_train(args, tmp_path / "run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), result.stderr[-3000:]
    assert lines[0].endswith("scripts/make_shards.py" if fault != "glob" else "'data.shards=\"...\"')"), lines[0]


def test_a_shard_image_over_data_max_image_pixels_is_one_line_or_skipped(shards: Path) -> None:
    """The shards' images are 40x30 (1,200 pixels): a limit of 1,000 refuses them as possible decompression bombs,
    in the loader's workers too, naming the sample; with data.skip_corrupt they are skipped (here: all of them)."""
    stream = open_shards(f"{shards}/val-{{000000..000001}}.tar", False, 0, False, max_pixels=1000)
    with pytest.raises(DataError) as error:
        list(ShardLoader(stream, 4, 2, seed=0, rank=0, world_size=1))
    message = first_line(error.value, 2000)
    assert "val-000000.tar: sample" in message and "has 1,200 pixels" in message
    assert "over the limit of data.max_image_pixels=1000" in message
    skipping = open_shards(f"{shards}/val-{{000000..000001}}.tar", False, 0, True, max_pixels=1000)
    with pytest.raises(DataError, match="no sample of this worker's first batch could be read"):  # all skipped
        list(ShardLoader(skipping, 4, 0, seed=0, rank=0, world_size=1))
