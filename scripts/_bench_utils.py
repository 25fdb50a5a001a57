"""Measuring helpers for ``scripts/benchmark.py``: interleaved timing, FLOP counting, the measured peak
FLOP/s of a matmul, and a description of the machine the figures come from."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:  # noqa: ANN001
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel that scaled_dot_product_attention
# runs on the CPU; without these, attention would count 0 FLOPs there (same formulas as the CUDA kernels')
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def synchronize(device: torch.device) -> None:
    """Wait for the queued CUDA kernels (a no-op on the CPU), so that a clock read after it covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` as the Trainer does; ``None`` (fp32) runs as is."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean wall time of ``calls`` back-to-back calls of ``fn``. On CUDA, timed by events recorded on the
    stream after a synchronize, so the figure covers the kernels and not only their launch."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start_s) / calls


def interleave(contenders: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call every contender once per round, after ``warmup`` unrecorded rounds, reversing the order every
    other round, so that drift in the machine's load falls on all of them alike. Each contender measures
    itself and returns seconds; the result holds, per contender, one figure per recorded round."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds = contenders[name]()
            if r >= warmup:
                times[name].append(seconds)
    return times


def paired_ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Median, min and max over the rounds of a/b, each round's figures taken side by side (paired),
    which cancels load changes slower than a round."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn`` runs (PyTorch's FlopCounterMode, with the
    CPU attention kernel added: 2 per multiply-add; elementwise ops, norms and the optimizer count 0)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def train_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp_dtype: torch.dtype | None) -> int:
    """FLOPs of one training step's forward and backward (cross-entropy loss); gradients are cleared after."""

    def forward_backward() -> None:
        with autocast(images.device, amp_dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()

    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    return flops


def infer_flops(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> int:
    """FLOPs of one inference forward pass."""

    def forward() -> None:
        with torch.inference_mode(), autocast(images.device, amp_dtype):
            model(images)

    return count_flops(forward)


def peak_flops(device: torch.device, dtype: torch.dtype, size: int, calls: int = 3, repeats: int = 3) -> float:
    """FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on ``device``: the practical peak that MFU is
    measured against (warmed up; median of ``repeats`` timings of ``calls`` matmuls each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds_per_call(lambda: a @ b, 2, device)  # warm-up: kernel selection, allocator, clocks
    seconds = statistics.median(seconds_per_call(lambda: a @ b, calls, device) for _ in range(repeats))
    return 2 * size**3 / seconds


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, object]:
    """What the figures depend on: CPU, cores, threads, library versions, GPU, and the load average."""
    info: dict[str, object] = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pair_row(part: str, name: str, times: dict[str, list[float]], items: int) -> dict:
    """One table row from two contenders' per-round seconds for ``items`` images each: throughputs from
    the median seconds, and the paired time ratio first/second."""
    (a, a_s), (b, b_s) = times.items()
    return {"part": part, "model": name, "a": a, "b": b, "a_img_s": items / statistics.median(a_s),
            "b_img_s": items / statistics.median(b_s), **paired_ratio(a_s, b_s), "seconds": times, "items": items}
