"""timm and torchvision models as backbones: the head is replaced and found by the optimizer."""

from __future__ import annotations

import pytest
import torch

from vitrain.errors import ConfigError, VitrainError
from vitrain.models.external import create_timm_model, create_torchvision_model
from vitrain.optim import param_groups


def head_members(model: torch.nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in param_groups(model, lr=1e-3, backbone_lr=1e-5) if g["name"].startswith("head")
            for p in g["params"]}


def test_timm_cnn_gets_a_new_head_and_its_own_learning_rate() -> None:
    model = create_timm_model("resnet18", num_classes=10, img_size=32, drop_path_rate=0.1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # img_size is left out for a CNN
    assert model.head_names == ("fc",)
    assert head_members(model) == {"fc.weight", "fc.bias"}


def test_timm_vit_takes_img_size() -> None:
    model = create_timm_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert model.pos_embed.shape[1] == 1 + 4


@pytest.mark.parametrize(("name", "head", "size"), [
    ("resnet18", "fc", 64), ("swin_t", "head", 64), ("convnext_tiny", "classifier.2", 64),
    ("vit_b_16", "heads.head", 32),
])
def test_torchvision_model_gets_a_new_head(name: str, head: str, size: int) -> None:
    model = create_torchvision_model(name, num_classes=7, img_size=size, drop_path_rate=0.1).eval()
    assert model.head_names == (head,)
    assert model.get_submodule(head).out_features == 7
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)
    assert head_members(model) == {f"{head}.weight", f"{head}.bias"}


def test_stochastic_depth_reaches_torchvision_swin() -> None:
    model = create_torchvision_model("swin_t", num_classes=2, drop_path_rate=0.3)
    probs = [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    assert max(probs) == pytest.approx(0.3)


def test_num_classes_zero_gives_features() -> None:
    assert create_timm_model("resnet18", num_classes=0).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    assert create_torchvision_model("resnet18", num_classes=0).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)


@pytest.mark.parametrize(("build", "name", "message"), [
    (create_timm_model, "resnet181", "unknown timm model 'resnet181' \\(model.name\\); did you mean resnet18"),
    (create_torchvision_model, "resnet_18", "unknown torchvision model 'resnet_18'.*resnet18"),
])
def test_unknown_names(build, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(name, num_classes=10)


def test_a_failed_download_says_to_use_a_local_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub answered the connection check, then the download failed: the reason's first sentence, whole words."""
    import timm

    reason = "We couldn't connect to the Hub because " + "the server kept refusing " * 12
    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(reason + ". Retry later")

    monkeypatch.setattr("vitrain.hub.hub_online", lambda *args: True)
    monkeypatch.setattr(timm, "create_model", failing)
    with pytest.raises(VitrainError) as info:
        create_timm_model("resnet18", num_classes=10, pretrained=True)
    message = str(info.value)
    assert message.startswith("could not fetch timm weights for 'resnet18' (OSError: We couldn't connect to the Hub")
    assert message.endswith(" ...); without network set model.pretrained=false and model.checkpoint=PATH to a local "
                            "weights file")
    shown = message.split("(OSError: ")[1].split(" ...)")[0]
    assert reason.startswith(shown + " ") and "Retry later" not in message and "\n" not in message  # whole words


def test_torchvision_failed_download(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    import torchvision

    def failing(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno 104] Connection reset by peer")

    monkeypatch.setattr("vitrain.hub.reachable", lambda *args: True)
    monkeypatch.setattr(torchvision.models, "get_model", failing)
    with pytest.raises(VitrainError, match="could not fetch torchvision weights for 'resnet18'.*URLError"):
        create_torchvision_model("resnet18", num_classes=10, pretrained=True)


def test_torchvision_weights_neither_cached_nor_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Checked before torchvision downloads: one line at once, naming the cache file and the ways on."""
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr("vitrain.hub.reachable", lambda *args: False)
    with pytest.raises(VitrainError) as info:
        create_torchvision_model("resnet18", num_classes=10, pretrained=True)
    assert str(info.value) == (
        f"torchvision's pretrained weights for 'resnet18' are not in torch's download cache ({tmp_path}/checkpoints/"
        f"resnet18-f37072fd.pth) and download.pytorch.org did not answer within 3 s; fetch them once with network "
        f"(or copy the file there), or set model.checkpoint=PATH to a local weights file, or model.pretrained=false "
        f"to start from random weights")
