"""scripts/benchmark.py on tiny models and sizes: the figures exist, are positive and add up; the FLOP
count matches the analytic count. No timing thresholds (those are the benchmark's own business)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vitrain.checkpoint import load_checkpoint
from vitrain.models import create_model

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPTS))  # the script imports its helper module as a sibling
        yield importlib.import_module("benchmark")


def nano_pair() -> dict[str, nn.Module]:
    """vitrain's vit_nano_patch4_16 and the same architecture built by timm (which has no such name)."""
    torch.manual_seed(0)
    size = dict(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4)
    return {"vitrain": create_model("vit_nano_patch4_16", 10),
            "timm": create_model("vit_tiny_patch16_224", 10, source="timm", **size)}


def test_flops_of_linear_layers_match_the_analytic_count(bench) -> None:
    """2 FLOPs per multiply-add. Forward of Linear(a, b) on B rows: 2*B*a*b. Backward: the weight gradient
    of every layer (2*B*a*b each) and the input gradient of every layer but the first (whose input, the
    image batch, needs none): so 2x the forward for one layer, and 2*B*(2ab + 3bc) for two."""
    B, a, b, c = 4, 6, 5, 3
    x, y = torch.randn(B, a), torch.tensor([0, 1, 2, 0])
    one = nn.Linear(a, c)
    assert bench.infer_flops(one, x, None) == 2 * B * a * c
    assert bench.train_flops(one, x, y, None) == 2 * (2 * B * a * c)
    two = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    assert bench.infer_flops(two, x, None) == 2 * B * (a * b + b * c)
    assert bench.train_flops(two, x, y, None) == 2 * B * (2 * a * b + 3 * b * c)
    assert all(p.grad is None for p in two.parameters())  # counting leaves no gradients behind


def test_model_rows_have_throughputs_ratios_and_mfu(bench) -> None:
    device = torch.device("cpu")
    peak = bench.peak_flops(device, torch.float32, 128, calls=1, repeats=1)
    rows = bench.bench_models("vit_nano_patch4_16", nano_pair(), batch_size=4, amp_dtype=None, steps=2, rounds=2,
                              peak=peak)
    assert [r["part"] for r in rows] == ["train", "infer"]
    for row in rows:
        assert (row["a"], row["b"]) == ("vitrain", "timm")
        assert row["a_img_s"] > 0 and row["b_img_s"] > 0 and row["a_mfu"] > 0 and row["b_mfu"] > 0
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert all(len(seconds) == 2 for seconds in row["seconds"].values())
        assert row["a_flops"] == row["b_flops"]  # the same architecture: the same work
    train, infer = rows
    # multiply-adds per image: the patch conv (16 patches of 4*4*3 -> 64); linears of 6 blocks (17 tokens: qkv,
    # proj, fc1, fc2) and the head; attention (q @ k.T and attn @ v over 17 x 17 tokens, 64 wide)
    conv = 16 * 48 * 64
    linear = 6 * 17 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 64 * 10
    attention = 6 * 2 * 17 * 17 * 64
    assert infer["a_flops"] == 2 * 4 * (conv + linear + attention)
    # backward: weight gradients everywhere, input gradients except the conv's (the images need none), and
    # SDPA's backward counted as 5 matmuls to the forward's 2 (it recomputes the scores)
    assert train["a_flops"] == 2 * 4 * (2 * conv + 3 * linear + 3.5 * attention)
    assert bench.judge(dict(train), "cpu", "fp32")["result"] == "-"  # no target for this model


def test_trainer_and_data_rows(bench, tmp_path: Path) -> None:
    device = torch.device("cpu")
    rows = bench.bench_trainer("vit_nano_patch4_16", device, "fp32", batch_size=4, steps=2, rounds=1,
                               workdir=tmp_path)
    assert [(row["a"], row["b"]) for row in rows] == [("Trainer", "bare loop"), ("Trainer, saves in place",
                                                                                  "bare loop")]
    for row in rows:
        assert row["a_img_s"] > 0 and row["b_img_s"] > 0 and row["ratio"] > 0
        assert row["saves_per_run"] == bench.TRAINER_EPOCHS  # one save per epoch, each one timed
        assert row["save_ms_training_thread"] > 0 and row["save_ms_written"] > 0
        assert bench.judge(row, "cpu", "fp32")["result"] in ("PASS", "MISS")
    # 2 contenders x (warm-up + 1 round) runs, each with last.pt and best.pt that load
    assert len([load_checkpoint(p) for p in tmp_path.glob("*/checkpoints/last.pt")]) == 4
    data = bench.bench_data(device, batch_size=4, batches=2, rounds=1, workers=0, img_size=32)
    assert data["b_img_s"] > 0 and data["items"] == 8
    if data["a"] is not None:  # the device path (vitrain.data.gpu)
        assert data["a_img_s"] > 0 and data["ratio"] > 0


def test_main_writes_json_and_judges_every_row(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--models", "vit_nano_patch4_16", "--parts", "data,trainer", "--batch-size", "4",
                "--trainer-steps", "2", "--rounds", "1", "--data-batch-size", "4", "--data-batches", "2",
                "--workers", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["part"] for r in report["rows"]] == ["data", "trainer", "trainer"]
    assert all("target" in r and "result" in r for r in report["rows"])
    assert report["machine"]["cores"] >= 1 and report["settings"]["precision"] == "fp32"
    assert "| trainer | vit_nano_patch4_16 | Trainer vs bare loop |" in capsys.readouterr().out
