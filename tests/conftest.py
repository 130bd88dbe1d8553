"""Parallel test runs (`pytest -n N`, pytest-xdist) without oversubscription: each worker gets its own share of
the usable cores (affinity mask), so torch in a worker, and every process a test starts (torchrun, Ray, the
CLI), uses that share rather than every core: two 2-thread torch processes on 2 cores were measured up to ~10x
slower than one. Serial runs are left as they are."""

from __future__ import annotations

import os

import torch


def _pin_xdist_worker() -> None:
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    cores = sorted(os.sched_getaffinity(0))
    index, workers = int(worker.removeprefix("gw")), int(count)
    if workers > len(cores) or workers <= 1:
        return
    share = cores[index * len(cores) // workers:(index + 1) * len(cores) // workers]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))
    torch.set_num_threads(len(share))


_pin_xdist_worker()
