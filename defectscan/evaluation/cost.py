"""What a model costs: parameters, FLOPs per forward pass (torch.utils.flop_counter, attention included), memory."""

from __future__ import annotations

import resource

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_registered = False


def _register_cpu_attention() -> None:
    """torch counts fused attention on CUDA but not the CPU kernel `F.scaled_dot_product_attention` dispatches
    to, so transformers would look almost free on a CPU. Same formula as torch's own: QK^T plus AV."""
    global _registered
    if _registered:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        try:
            @register_flop_formula(op)
            def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
                b, h, sq, d = query
                return 2 * b * h * sq * key[-2] * d + 2 * b * h * sq * key[-2] * value[-1]
        except RuntimeError:  # a newer torch registers it itself
            pass
    _registered = True


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on `x` (a multiply-add counts as 2)."""
    _register_cpu_attention()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reset_peak_rss() -> None:
    """Start the process's peak-RSS count afresh (Linux), so a benchmark cell's evaluation does not report the
    peak of the training that ran before it in the same process. Elsewhere the peak is the process's own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
