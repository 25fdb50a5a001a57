"""DeiT: the variants have timm's names and shapes, timm's weights give timm's logits, the two heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from vitrain.errors import ConfigError
from vitrain.models import create_model, deit, list_models
from vitrain.models.vit import VisionTransformer

PLAIN = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
DISTILLED = ["deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
             "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384"]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so that no head or bias is zero and the logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def images(size: int = 224, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_lists_the_deit_variants() -> None:
    assert set(PLAIN + DISTILLED) <= set(list_models("deit_*"))


@pytest.mark.parametrize("name", PLAIN + DISTILLED)
def test_variant_has_timms_parameter_names_and_shapes(name: str) -> None:
    """Built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        ref = timm.create_model(name, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(ours, deit.DistilledVisionTransformer) == (name in DISTILLED)
    assert isinstance(ours, VisionTransformer)


@pytest.mark.parametrize("name,wrap", [("deit_tiny_distilled_patch16_224", False),
                                       ("deit_small_distilled_patch16_224", True)])
def test_timm_weights_via_file_give_timms_logits(tmp_path: Path, name: str, wrap: bool) -> None:
    """timm's model with random weights -> file (the small one wrapped as {"model": ...}, the DeiT
    release layout) -> create_model(name, checkpoint=file) -> the same eval logits; training mode gives timm's pair."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model(name))
    path = tmp_path / "deit.pth"
    torch.save({"model": ref.state_dict()} if wrap else ref.state_dict(), path)
    ours = create_model(name, checkpoint=path)
    x = images()
    with torch.no_grad():
        logits, expected = ours.eval()(x), ref.eval()(x)
        ref.set_distilled_training(True)
        cls_logits, dist_logits = ours.train()(x)
        ref_cls, ref_dist = ref.train()(x)
    assert logits.shape == (2, 1000)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (cls_logits - ref_cls).abs().max().item() <= 1e-4
    assert (dist_logits - ref_dist).abs().max().item() <= 1e-4
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)


def test_training_mode_returns_both_heads_and_eval_their_average() -> None:
    model = randomized(create_model("deit_tiny_distilled_patch16_224", num_classes=5, depth=1, img_size=32))
    x = images(32)
    outputs = model.train()(x)
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(2, 5), (2, 5)]
    assert not torch.allclose(outputs[0], outputs[1])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), (outputs[0] + outputs[1]).detach() / 2)


def test_features_only_gives_the_mean_of_both_tokens() -> None:
    """num_classes=0 (pooled features), as timm: the average of the CLS and distillation tokens' features,
    in training mode too."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0, depth=2)).eval()
    ours = create_model("deit_tiny_distilled_patch16_224", num_classes=0, depth=2)
    ours.load_state_dict(ref.state_dict())
    x = images()
    with torch.no_grad():
        features, expected = ours.eval()(x), ref(x)
        tokens = ours.forward_features(x)
        assert ours.train()(x).shape == (2, 192)
    assert features.shape == (2, 192)
    assert (features - expected).abs().max().item() <= 1e-5
    torch.testing.assert_close(features, (tokens[:, 0] + tokens[:, 1]) / 2)


def test_init_follows_timm() -> None:
    torch.manual_seed(0)
    model = create_model("deit_small_distilled_patch16_224", num_classes=10, depth=1)
    for tensor in (model.dist_token, model.pos_embed):
        assert abs(tensor.std().item() - 0.02) < 0.003 and tensor.abs().max().item() <= 2.0
    assert model.pos_embed.shape == (1, 14 * 14 + 2, 384)
    assert abs(model.head_dist.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.head_dist.bias) == 0


def test_no_weight_decay_and_head_names() -> None:
    model = create_model("deit_tiny_distilled_patch16_224", depth=1)
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert model.head_names == ("head", "head_dist")
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in model.head_names)


def test_reset_classifier_resets_both_heads() -> None:
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=1, img_size=32)
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3
    assert model.eval()(images(32)).shape == (2, 3)
    model.reset_classifier(0)
    assert model.eval()(images(32)).shape == (2, 192)


def test_average_pooling_is_refused() -> None:
    with pytest.raises(ConfigError, match="set model.global_pool=token"):
        create_model("deit_tiny_distilled_patch16_224", global_pool="avg")
