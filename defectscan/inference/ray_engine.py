"""`infer --engine ray`: a folder of images mapped over a Ray cluster, one model per actor.

Ray Data streams the image list through an actor pool (`map_batches` with a callable class): each actor loads
the checkpoint once, then writes each of its images' output folders exactly as the local engine does
(`write_prediction`, atomic per image) and sends back only a small JSON summary, so nothing large crosses the
object store. Images, checkpoint and output folder are paths every node must see (a shared file system: the usual
set-up for gigapixel inspection images, which are read tile by tile and never shipped whole).

Ray is an optional extra (`pip install "defectscan[ray]"`); it is imported only here, only when asked for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from defectscan.errors import DefectscanError, one_line
from defectscan.schemas import InferOptions

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # only summaries travel: a locally started Ray need not claim 30 % of RAM


@dataclass(frozen=True)
class RayPlan:
    """How the pool is sized: `workers` actors, each with `cpus` CPU threads and `gpus` GPUs."""

    workers: int
    cpus: int
    gpus: int


def require() -> None:
    """A one-line error, before any model is loaded, when Ray is not installed."""
    _import_ray()


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise DefectscanError('--engine ray needs Ray: pip install "defectscan[ray]"') from None
    return ray


def connect(address: str | None, *, cpus: int | None = None) -> None:
    """Join the cluster at `address` ('auto': the one `ray start` runs on this node; ray://host:10001 for a remote
    one), or start a private local Ray with `cpus` CPUs (default: every core) when `address` is None."""
    ray = _import_ray()
    for name in ("ray", "ray.data"):  # start-up notes, "progress bars disabled", per-dataset timings
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    try:
        if address is None:
            ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise DefectscanError(f"could not start or join {where}: {one_line(exc, last=True)}") from None


def plan(device: str, workers: int | None, threads: int | None, images: int) -> RayPlan:
    """Actors per cluster: one per GPU when the cluster has GPUs and the device allows them, else one per
    `threads` CPUs (1 thread each by default: on CPUs, N single-threaded processes beat one N-threaded one);
    never more than there are images."""
    ray = _import_ray()
    resources = ray.cluster_resources()
    cpus_total, gpus_total = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus_total > 0)
    if use_gpu and gpus_total == 0:
        raise DefectscanError(f"--device {device}: the Ray cluster has no GPUs")
    if device.startswith("cuda:"):
        raise DefectscanError("--engine ray places each worker on its own GPU: use --device cuda or auto, not cuda:N")
    cpus = threads or 1
    if cpus > max(cpus_total, 1):
        raise DefectscanError(f"--threads {cpus}: the Ray cluster has {cpus_total} CPUs")
    default = gpus_total if use_gpu else max(1, cpus_total // cpus)
    return RayPlan(max(1, min(workers or default, images)), cpus, 1 if use_gpu else 0)  # no idle actors


class _ImageWorker:
    """A Ray actor: one Predictor, many images (rows of `index`, `path`, `out_dir`)."""

    def __init__(self, checkpoint: str | None, options: dict, threads: int, max_pixels: int) -> None:
        from defectscan.inference.predictor import Predictor
        from defectscan.io.images import set_max_pixels
        from defectscan.runtime import set_threads

        set_threads(threads)
        set_max_pixels(max_pixels)  # the driver's limit: a worker process starts with the default
        # device "auto" or "cuda" finds this actor's own GPU: Ray sets CUDA_VISIBLE_DEVICES per actor
        self.predictor = Predictor.from_checkpoint(checkpoint, InferOptions(**options))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from defectscan.inference.writers import infer_one

        results = []
        for path, out_dir in zip(batch["path"], batch["out_dir"]):
            summary, error = infer_one(self.predictor, Path(str(path)), Path(str(out_dir)))
            results.append(json.dumps({"summary": summary, "error": error}))
        return {"index": batch["index"], "result": np.array(results, dtype=object)}


def ray_infer(items: list[tuple[int, Path, Path]], *, checkpoint: Path | None, options: InferOptions,
              pool: RayPlan, max_pixels: int) -> Iterator[tuple[int, dict | None, str | None]]:
    """Run every (index, image path, output folder) on the pool; yields (index, summary or None, error or None)
    as images finish (completion order). Call `connect` first."""
    ray = _import_ray()
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the CLI shows its own bar, one step per finished image
    context.print_on_execution_start = False
    rows = [{"index": i, "path": str(p.resolve()), "out_dir": str(o.resolve())} for i, p, o in items]
    # Ray 2.5x logs one "constructor arguments in the object store" line per pool whatever they are (ray #57733)
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _ImageWorker, batch_size=1, compute=ActorPoolStrategy(size=pool.workers),
        fn_constructor_kwargs={"checkpoint": str(checkpoint) if checkpoint else None,
                               "options": options.model_dump(), "threads": pool.cpus, "max_pixels": max_pixels},
        num_cpus=pool.cpus, num_gpus=pool.gpus)
    try:
        for row in dataset.iter_rows():
            result = json.loads(row["result"])
            yield int(row["index"]), result["summary"], result["error"]
    except ray.exceptions.RayError as exc:
        # a RayTaskError's last line is the worker's own error
        raise DefectscanError(f"a Ray worker failed: {one_line(exc, last=True)}") from None


def shutdown() -> None:
    ray = _import_ray()
    ray.shutdown()

