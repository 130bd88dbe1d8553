"""Device and precision choices shared by inference and training."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from defectscan.errors import DefectscanError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`, or None for full float32.

    'auto' means mixed precision on CUDA only: on CPU, bf16 changes results measurably for a small speed gain on
    some CPUs, so it stays an explicit choice.
    """
    if amp not in AMP_CHOICES:
        raise DefectscanError(f"unknown amp mode '{amp}' (choose from {', '.join(AMP_CHOICES)})")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type == "cpu":
        raise DefectscanError("amp fp16 is not supported on CPU; use bf16 or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
