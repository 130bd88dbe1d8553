"""Where a result came from: library versions and the hardware it ran on, recorded in every output."""

from __future__ import annotations

import platform
from pathlib import Path

from defectscan.runtime import cpu_bf16


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


def hardware() -> str:
    """CPU (with its native bf16 support), torch threads and the GPU if any, in one line."""
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_name()} (bf16: {cpu_bf16()}), {torch.get_num_threads()} threads{gpu}"
