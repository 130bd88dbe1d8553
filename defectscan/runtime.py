"""Device and precision choices shared by inference and training."""

from __future__ import annotations

import contextlib
import math
import os
from functools import cache
from pathlib import Path
from typing import Iterator

import torch

from defectscan.errors import DefectscanError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def _cgroup_cpu_limit() -> float | None:
    """CPUs a container's quota allows (`docker --cpus`), from cgroup v2 or v1; None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # v1: -1 without a quota
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask (taskset, cpusets) and a container's CPU quota, not the
    host's count that torch alone may see."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def set_threads(threads: int | None) -> int:
    """Threads for torch's CPU kernels: `threads`, or every usable core (torch alone may count the host's)."""
    n = threads or usable_cores()
    torch.set_num_threads(n)
    return n


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable device is a clear error, not a crash later."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DefectscanError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DefectscanError(f"device '{device}' requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DefectscanError(f"device '{device}' requested but MPS is not available on this machine")
    return dev


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere): detected at run time, since the same
    machine type has come with AMX-BF16 (Intel Xeon) and without it (AMD EPYC)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16() -> str:
    """Native bfloat16 support of this CPU: 'AMX-BF16 + AVX512-BF16', 'AVX512-BF16', or 'none'."""
    flags = cpu_flags()
    found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return " + ".join(found) or "none"


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What a forward pass computes in, for output metadata: float32, or mixed with bfloat16 / float16."""
    return {None: "float32", torch.bfloat16: "mixed bfloat16", torch.float16: "mixed float16"}[amp_dtype]


def resolve_amp(amp: str, device: torch.device, *, trained_in: str | None = None) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`, or None for full float32.

    'auto' means mixed precision on CUDA. On a CPU with native bf16 (AVX512-BF16, AMX-BF16) it means bfloat16 only
    for a model trained in mixed bfloat16 (`trained_in`, a `precision_name`): measured on BSData's test split
    (README, "bf16 and channels-last on CPUs"), bf16 inference of bf16-trained models changed under 0.01 % of mask
    pixels and defect IoU by under 0.005, while a float32-trained model lost 0.019 IoU, beyond what a default may
    cost: float32-trained models stay float32 on CPUs unless bf16 is asked for.
    """
    if amp not in AMP_CHOICES:
        raise DefectscanError(f"unknown amp mode '{amp}' (choose from {', '.join(AMP_CHOICES)})")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and trained_in == precision_name(torch.bfloat16) and cpu_bf16() != "none":
            return torch.bfloat16
        return None
    if amp == "fp16" and device.type == "cpu":
        raise DefectscanError("amp fp16 is not supported on CPU; use bf16 or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def exact_float32(device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """Make float32 on CUDA mean IEEE float32: torch lets cuDNN convolutions run in TF32 (a 10-bit mantissa) by
    default on Ampere and later GPUs, so a model 'trained in float32' there would not be what its sidecar says, nor
    comparable with a CPU's float32 cell of the same study. Mixed-precision runs keep torch's defaults. The flags are
    per process, as torch keeps them."""
    if device.type == "cuda" and amp_dtype is None:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def emulated_bf16_note(device: torch.device, dtype: torch.dtype | None) -> str:
    """The warning due when bf16 autocast is asked for on a CPU without native bf16 (no AVX512-BF16, no AMX), where the
    bf16 kernels are emulated: Lite0 training steps took 9-18x longer than float32 on an AMD EPYC without
    AVX-512 (scripts/bench_training.py). Empty when there is nothing to say."""
    if dtype is torch.bfloat16 and device.type == "cpu" and cpu_bf16() == "none":
        return ("this CPU has no native bf16 (AVX512-BF16 or AMX-BF16), so bf16 autocast is emulated and many "
                "times slower than float32 here; float32 (amp off) is the fast choice on this machine")
    return ""


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
