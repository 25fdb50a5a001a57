"""LoRA through peft (vitrain.lora): what trains, merging, peft's adapter files, a training run, and peft missing."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vitrain.errors import ConfigError  # noqa: E402
from vitrain.lora import (  # noqa: E402
    apply_lora,
    has_lora,
    load_adapters,
    lora_targets,
    merge_lora,
    save_adapters,
    trainable_parameters,
)
from vitrain.models import classifier_names, create_model  # noqa: E402
from vitrain.models.config import LoraSpec, ModelConfig  # noqa: E402
from vitrain.models.heads import in_module  # noqa: E402
from vitrain.optim import build_optimizer  # noqa: E402

# name, img_size, source, constructor overrides, adapted Linear layers (qkv, proj, fc1, fc2 per block)
MODELS = {
    "vit": ("vit_nano_patch4_16", 16, "vitrain", {}, 24),
    "deit": ("deit_nano_distilled_patch4_16", 16, "vitrain", {}, 24),
    "swin": ("swin_nano_patch2_window4_32", 32, "vitrain", {}, 24),
    "timm_vit": ("vit_tiny_patch16_224", 32, "timm", {"depth": 2}, 8),
}


def build(key: str, seed: int = 0) -> nn.Module:
    name, size, source, extra, _ = MODELS[key]
    torch.manual_seed(seed)
    return create_model(name, num_classes=5, img_size=size, source=source, **extra).eval()


def images(key: str, n: int = 4) -> torch.Tensor:
    size = MODELS[key][1]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps with vitrain's optimizer groups (weight decay 0.05), in eval mode (no dropout)."""
    optimizer = build_optimizer(model, lr=lr)
    labels = torch.arange(x.shape[0]) % 5
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("key", MODELS)
def test_only_the_adapters_and_the_heads_train(key: str) -> None:
    plain = build(key)
    layers = {name: plain.get_submodule(name) for name in lora_targets(plain, ["qkv", "proj", "fc1", "fc2"])}
    heads = classifier_names(plain)
    head_size = sum(p.numel() for n, p in plain.named_parameters() if in_module(n, heads))
    total = sum(p.numel() for p in plain.parameters())
    model = apply_lora(plain, LoraSpec(rank=4))
    assert len(layers) == MODELS[key][4]
    expected = {f"{name}.lora_{ab}.default.weight" for name in layers for ab in "AB"}
    expected |= {n for n, _ in model.named_parameters() if in_module(n, heads)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    adapters = sum(4 * (layer.in_features + layer.out_features) for layer in layers.values())
    assert trainable_parameters(model) == (adapters + head_size, total + adapters)
    qkv = [m for n, m in model.named_modules() if n.endswith("attn.qkv")]
    assert qkv and all(isinstance(m, LoraLayer) for m in qkv)  # the fused q, k, v projection: one adapter
    assert all(m.lora_B["default"].weight.shape == (3 * m.in_features, 4) for m in qkv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, images(key), steps=2)  # step 1 moves B (zero at the start), step 2 then moves A too
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


@pytest.mark.parametrize("key", MODELS)
def test_merged_model_is_plain_and_gives_the_same_logits(key: str) -> None:
    model, x = apply_lora(build(key), LoraSpec(rank=4, alpha=8)), images(key)
    train_steps(model, x)
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoraLayer))
    adapted = logits(model, x)
    merged = merge_lora(model)
    assert (logits(merged, x) - adapted).abs().max().item() <= 1e-5
    assert not has_lora(merged) and not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert has_lora(model) and torch.equal(logits(model, x), adapted)  # merged a copy
    fresh = build(key, seed=1)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert (logits(fresh, x) - adapted).abs().max().item() <= 1e-5


def test_merged_vitrain_vit_loads_into_timms_model() -> None:
    import timm

    torch.manual_seed(0)
    model = apply_lora(create_model("vit_tiny_patch16_224", num_classes=5, depth=2), LoraSpec(rank=8))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    train_steps(model, x)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=2)
    reference.load_state_dict(merge_lora(model).state_dict(), strict=True)
    assert (logits(reference, x) - logits(model, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("key", ["deit", "swin"])  # two heads; a nested head (head.fc)
def test_adapter_folder_is_peft_format_and_loads_back(key: str, tmp_path: Path) -> None:
    base, x = build(key), images(key)
    model = apply_lora(copy.deepcopy(base), LoraSpec(rank=4))
    train_steps(model, x)
    expected = logits(model, x)
    folder = save_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    heads = list(classifier_names(base))
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["modules_to_save"]) == ("LORA", 4, 16, heads)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in tensors)
    adapters = 2 * MODELS[key][4]  # A and B of each adapted layer
    assert sum(".lora_" in k for k in tensors) == adapters and len(tensors) == adapters + 2 * len(heads)
    loaded = load_adapters(copy.deepcopy(base), folder)
    assert (logits(loaded, x) - expected).abs().max().item() <= 1e-6
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))  # peft's own loader
    assert (logits(wrapped, x) - expected).abs().max().item() <= 1e-6


def test_training_run_saves_adapters_its_checkpoint_evaluates_and_resumes(tmp_path: Path) -> None:
    from vitrain.checkpoint import load_training_checkpoint
    from vitrain.config import compose
    from vitrain.evaluate import evaluate_checkpoint
    from vitrain.inference import load_trained
    from vitrain.train import train

    metrics = train(compose(["model.lora.rank=4", "trainer.epochs=1", "data.batch_size=720",
                             "trainer.progress=false"]), tmp_path)
    folder = tmp_path / "checkpoints" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    best = tmp_path / "checkpoints" / "best.pt"
    assert load_training_checkpoint(best)["config"]["model"]["lora"]["rank"] == 4
    result = evaluate_checkpoint(best, device="cpu", output=tmp_path / "eval.json")
    assert result["model"]["top1"] == pytest.approx(metrics["best_top1"], abs=1e-6)
    trained = load_trained(best, "cpu")
    assert trained.lora["rank"] == 4 and has_lora(trained.model)
    plain = create_model(**trained.spec)
    plain.load_state_dict(trained.merged().state_dict(), strict=True)
    x = torch.randn(8, 3, 16, 16)
    assert (logits(plain, x) - logits(trained.model, x)).abs().max().item() <= 1e-5
    resumed = train(compose(["model.lora.rank=4", "trainer.epochs=2", "data.batch_size=720", "trainer.progress=false",
                             "trainer.resume=auto"]), tmp_path)  # the adapters' weights load back into adapters
    assert resumed["steps"] == 2 * metrics["steps"] and len(resumed["history"]) == 2


def test_rank_zero_is_plain_and_every_weight_trains() -> None:
    from vitrain.build import build_model

    model = build_model(ModelConfig(), 5)
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("override", "message"), [
    ("model.lora.rank=-1", "model.lora.rank must be >= 0"),
    ("model.lora.alpha=0", "model.lora.alpha must be positive"),
    ("model.lora.dropout=1", "model.lora.dropout is a rate"),
    ("model.lora.targets=[]", "model.lora.targets must list module name suffixes"),
])
def test_out_of_range_lora_settings_are_refused_naming_the_key(override: str, message: str) -> None:
    from vitrain.config import compose, to_config

    with pytest.raises(ConfigError) as e:
        to_config(compose([override]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_targets_that_match_no_linear_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.lora.targets=\['query'\] matches no Linear layer"):
        apply_lora(build("vit"), LoraSpec(rank=4, targets=["query"]))


def test_without_peft_the_error_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitrain.build import build_model

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(lora=LoraSpec(rank=4)), 5)
    assert str(e.value) == 'model.lora.rank=4 needs peft: pip install -e ".[peft]" (or pip install peft)'


def test_freezing_the_backbone_is_refused_with_lora() -> None:
    from vitrain.config import compose, to_config
    from vitrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.lora\.rank > 0 trains only the adapters and the head already"):
        to_config(compose(["model.lora.rank=4", "trainer.freeze_backbone=true"]))
