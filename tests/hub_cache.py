"""A local Hugging Face cache of timm weights, written by the tests that load ``model.pretrained=true`` offline
(``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` on the folder): no network here, so the weights are random."""

from __future__ import annotations

from pathlib import Path


def write_hub_cache(root: Path, name: str) -> Path:
    """timm's files for ``name`` (config.json, model.safetensors, as timm's save_for_hf writes them; random weights)
    where huggingface_hub caches repo timm/<name>: models--timm--<name>/snapshots/<commit>, refs/main naming it.
    A name without a tag is cached as timm's default tag (vit_small_patch16_224.augreg_in21k_ft_in1k)."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(name, pretrained=False)
    repo = model.pretrained_cfg["hf_hub_id"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    save_for_hf(model, str(snapshot), safe_serialization=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot
