"""Per-GPU memory of training ViT-B/16 to ViT-G/14 under DDP and FSDP2 (``trainer.strategy``), on paper: parameter
counts from the models built on the meta device (no memory, no weights), and activation sizes measured there: the
bytes autograd saves for the backward of one forward pass at the given batch, counted by a saved-tensors hook, with
and without activation checkpointing (``model.grad_checkpointing``). The pass runs as under CUDA autocast to bf16
(``trainer.precision=bf16``): linear layers, the patch convolution and attention in bf16, layer norms and the
residual stream in fp32, attention as the fused kernels save it.

    python scripts/memory_plan.py [--batch 32] [--gpus 8 64] [--out memory_plan.json]
    python scripts/memory_plan.py --check vit_base_patch16_224 --batch 32   # on a GPU: against max_memory_allocated

What each GPU holds, with AdamW and bf16 autocast over fp32 weights (P parameters, N GPUs, a block's parameters B):

- DDP: fp32 weights 4P, their bf16 copies cached by autocast 2P, fp32 gradients 4P, DDP's gradient buckets 4P,
  AdamW's two moments 8P, and the activations of the whole batch.
- FSDP2 (each block sharded, then the root; bf16 parameters, fp32 gradient reduction): the shards 4P/N + 4P/N + 8P/N,
  two blocks gathered at a time in bf16 (the one running and the one prefetched; 2 x 2B), their fp32 gradients before
  the reduce-scatter (2 x 4B), the root's own parameters gathered (embeddings, norm, head), and the activations.
- With activation checkpointing each block keeps only its input, and one block's activations are recomputed at a time
  during the backward: the saved bytes outside the blocks + depth x the block input + one block's saved bytes.

Left out: the CUDA context and cuBLAS/NCCL workspaces (about 1 GiB), the allocator's fragmentation, and temporaries
that live only inside one kernel (attention's are small with the fused kernels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

MODELS = {  # timm's names: the plan's rows
    "ViT-B/16": "vit_base_patch16_224",
    "ViT-L/16": "vit_large_patch16_224",
    "ViT-H/14": "vit_huge_patch14_224",
    "ViT-g/14": "vit_giant_patch14_224",
    "ViT-G/14": "vit_gigantic_patch14_224",
}
GIB = 2**30


def build(name: str, device: str = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
    import timm

    with torch.device(device):
        return timm.create_model(name, num_classes=1000).to(dtype)


def saved_bytes(model: nn.Module, batch: int, device: str = "meta") -> dict[str, int]:
    """Bytes autograd saves for the backward of one forward pass of ``batch`` images: ``total``, and per part:
    ``block`` (the largest block's), ``block_input`` (one block's input), ``outside`` (all but the blocks).
    Attention is counted as the fused kernel saves it (query, key, value, output and log-sum-exp; no N x N matrix),
    and what does not grow with the batch (the parameters and their transposed views) is left out: the difference
    of the counts at 2 x ``batch`` and at ``batch``."""
    one, two = _saved(model, batch, device), _saved(model, 2 * batch, device)
    return {"total": two["total"] - one["total"], "block": two["block"] - one["block"],
            "block_input": one["block_input"], "outside": two["outside"] - one["outside"], "depth": one["depth"]}


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _LINEAR(x.bfloat16(), weight.bfloat16(), None if bias is None else bias.bfloat16())


def _bf16_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 *args: object) -> torch.Tensor:
    return _CONV2D(x.bfloat16(), weight.bfloat16(), None if bias is None else bias.bfloat16(), *args)


_LINEAR, _CONV2D = nn.functional.linear, nn.functional.conv2d


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     **_: object) -> torch.Tensor:
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu if q.device.type == "cpu" else \
        torch.ops.aten._scaled_dot_product_flash_attention  # CUDA's, whose meta kernel the plan runs
    return op(q, k, v, dropout_p, is_causal, scale=scale)[0]


def _saved(model: nn.Module, batch: int, device: str) -> dict[str, int]:
    dtype = next(model.parameters()).dtype
    size = model.patch_embed.img_size
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # alive until counted, so that no id is reused
    per_block: list[int] = []
    inputs: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in seen:
            seen[id(x)] = x.numel() * x.element_size()
            keep.append(x)
        return x

    def before(module: nn.Module, args: tuple) -> None:
        inputs.append(args[0].numel() * args[0].element_size())
        per_block.append(sum(seen.values()))

    def after(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        per_block[-1] = sum(seen.values()) - per_block[-1]

    hooks = [b.register_forward_pre_hook(before) for b in model.blocks]
    hooks += [b.register_forward_hook(after) for b in model.blocks]
    F = nn.functional  # noqa: N806
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention, F.linear, F.conv2d = _fused_attention, _bf16_linear, _bf16_conv2d  # autocast's
    try:
        with saved_tensors_hooks(pack, lambda x: x):
            model(torch.zeros(batch, 3, *size, device=device, dtype=dtype))
    finally:
        F.scaled_dot_product_attention, F.linear, F.conv2d = sdpa, _LINEAR, _CONV2D
        for h in hooks:
            h.remove()
    total = sum(seen.values())
    return {"total": total, "block": max(per_block), "block_input": inputs[0],
            "outside": total - sum(per_block), "depth": len(per_block)}


def plan(name: str, batch: int, gpus: list[int]) -> dict:
    """The memory plan of one model: parameter counts and activations measured on the meta device, then the
    per-GPU figures of DDP and FSDP2 on each number of GPUs (GiB)."""
    model = build(name)
    p = sum(t.numel() for t in model.parameters())
    block = max(sum(t.numel() for t in b.parameters()) for b in model.blocks)
    root = p - sum(sum(t.numel() for t in b.parameters()) for b in model.blocks)
    act = saved_bytes(model, batch)
    checkpointed = act["outside"] + act["depth"] * act["block_input"] + act["block"]
    rows = {"params": p, "block_params": block, "activations_gib": act["total"] / GIB,
            "activations_checkpointed_gib": checkpointed / GIB, "ddp": {}, "fsdp2": {}}
    ddp = {"parameters": 6 * p, "gradients": 8 * p, "optimizer": 8 * p}  # fp32 + bf16 cache; grads + buckets
    rows["ddp"] = _totals(ddp, act["total"], checkpointed)
    for n in gpus:
        shards = {"parameters": 4 * p / n + 2 * 2 * block + 2 * root, "gradients": 4 * p / n + 2 * 4 * block,
                  "optimizer": 8 * p / n}
        rows["fsdp2"][n] = _totals(shards, act["total"], checkpointed)
    return rows


def _totals(parts: dict[str, float], activations: float, checkpointed: float) -> dict[str, float]:
    state = sum(parts.values())
    return {**{k: v / GIB for k, v in parts.items()}, "total_gib": (state + activations) / GIB,
            "total_checkpointed_gib": (state + checkpointed) / GIB}


def table(plans: dict[str, dict], batch: int, gpus: list[int]) -> str:
    lines = [f"| model | params | activations, batch {batch} (with checkpointing) | DDP: weights / grads / AdamW | "
             f"DDP total (with checkpointing) | " + " | ".join(f"FSDP2 on {n}: total (with checkpointing)"
                                                          for n in gpus) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in gpus) + " |"]
    for label, r in plans.items():
        d = r["ddp"]
        fsdp = " | ".join(f"{r['fsdp2'][n]['total_gib']:.1f} ({r['fsdp2'][n]['total_checkpointed_gib']:.1f})"
                          for n in gpus)
        lines.append(f"| {label} | {r['params'] / 1e6:,.0f}M | {r['activations_gib']:.1f} "
                     f"({r['activations_checkpointed_gib']:.1f}) | {d['parameters']:.1f} / {d['gradients']:.1f} / "
                     f"{d['optimizer']:.1f} | {d['total_gib']:.1f} ({d['total_checkpointed_gib']:.1f}) | {fsdp} |")
    return "\n".join(lines)


def check(name: str, batch: int) -> dict:
    """On a GPU: one training step of ``name`` in one process (DDP's figure without its buckets: 4P less) against
    ``torch.cuda.max_memory_allocated``."""
    model = build(name, "cuda", torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, *model.patch_embed.img_size, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the optimizer's moments
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() / GIB
    r = plan(name, batch, [])
    predicted = r["ddp"]["total_gib"] - 4 * r["params"] / GIB
    return {"model": name, "batch": batch, "predicted_gib": predicted, "measured_gib": measured}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images per GPU")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="numbers of GPUs for FSDP2")
    p.add_argument("--check", help="on a GPU: compare one model's figure with torch.cuda.max_memory_allocated")
    p.add_argument("--out", type=Path, default=Path("memory_plan.json"))
    args = p.parse_args()
    if args.check:
        print(json.dumps(check(args.check, args.batch), indent=2))
        return
    plans = {label: plan(name, args.batch, args.gpus) for label, name in MODELS.items()}
    args.out.write_text(json.dumps(plans, indent=2))
    print(table(plans, args.batch, args.gpus))


if __name__ == "__main__":
    main()
