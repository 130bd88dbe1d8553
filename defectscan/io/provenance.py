"""Where a result came from: library versions and the hardware it ran on, recorded in every output."""

from __future__ import annotations

import platform
from pathlib import Path


def library_versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import timm
    import torch

    import defectscan

    return {"defectscan": defectscan.__version__, "torch": torch.__version__,
            "segmentation_models_pytorch": smp.__version__, "timm": timm.__version__}


def cpu_name() -> str:
    """The CPU model as the OS names it (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere): detected at run time, since the same
    machine type has come with AMX-BF16 (Intel Xeon) and without it (AMD EPYC)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16() -> str:
    """Native bfloat16 support of this CPU: 'AMX-BF16 + AVX512-BF16', 'AVX512-BF16', or 'none'."""
    flags = cpu_flags()
    found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return " + ".join(found) or "none"


def hardware() -> str:
    """CPU (with its native bf16 support), torch threads and the GPU if any, in one line."""
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_name()} (bf16: {cpu_bf16()}), {torch.get_num_threads()} threads{gpu}"
