"""`defectscan train`: crops -> model -> validation through `Predictor` and the tiling engine -> best checkpoint,
resumable. The run directory's files are `RunDir`'s business (training/rundir.py).

Determinism: crop `i` of the run depends only on (seed, i) and the dropout RNG is reseeded each epoch, so on the
CPU a run resumed from its last epoch checkpoint ends with the same weights as an uninterrupted one.

Under torchrun (`shard`), DistributedDataParallel: every process takes an equal part of each global batch
(`IndexRange`), gradients are averaged, validation is sharded and reduced exactly (`evaluate`), and rank 0 alone
writes the run directory (which must be on a filesystem every process sees, for --resume).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from defectscan.data import Splits, label_budget, load_dataset, split_dataset
from defectscan.data.dataset import SegmentationDataset
from defectscan.data.cache import cache_root, choose_mode, load_images, load_training_pairs
from defectscan.data.sampling import CropDataset, IndexRange, MixedCrops, build_augment, group_shares
from defectscan.distributed import SINGLE, Shard, processes_on_this_node
from defectscan.errors import DefectscanError
from defectscan.evaluation import Evaluation, evaluate
from defectscan.inference import ClassMap, Predictor
from defectscan.io.provenance import hardware
from defectscan.metrics import (ScoreHistogram, ThresholdChoice, choose_threshold, read_validation_scores,
                                validation_scores)
from defectscan.models import ModelSpec, build_model, load_checkpoint, read_sidecar, save_checkpoint, set_threshold
from defectscan.models.weights import match_state_dict
from defectscan.runtime import (autocast, emulated_bf16_note, exact_float32, precision_name, resolve_amp,
                                resolve_device, usable_cores)
from defectscan.schemas import EvalOptions
from defectscan.tiling import validate_tile
from defectscan.training.config import Config
from defectscan.training.losses import build_loss
from defectscan.training.optim import build_optimizer, lr_at, optimizer_step, set_lr, weight_average
from defectscan.training.pseudolabels import load_pseudolabels
from defectscan.training.rundir import RunDir

Log = Callable[[str], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metric: float | None
    epochs_run: int
    seconds: float
    test: dict | None


def step_line(epoch: int, epochs: int, k: int, steps: int, recent_losses: list[float], lr: float, t_epoch: float,
              steps_left: int) -> str:
    """The log line every `log_every` steps: position, recent loss, learning rate, speed and time left."""
    rate = (k + 1) / (time.perf_counter() - t_epoch)
    return (f"epoch {epoch}/{epochs} step {k + 1}/{steps} loss {float(np.mean(recent_losses)):.4f} lr {lr:.3g} "
            f"{rate:.2f} steps/s, ETA {steps_left / rate / 60:.0f} min")


def loader_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """DataLoader worker processes for `sampling.workers`. auto: none on a CPU, where a batch of crops costs under
    0.3 % of a training step and a worker would take a core from the model; on a GPU up to 4 per training process
    of this machine (`processes`), each keeping a core, since one thread making 32 crops took 13-42 % of an H100's
    step (README, "On a GPU").
    Crops do not depend on the number of workers (`data.sampling.IndexRange`)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(0, min(4, usable_cores() // max(processes, 1) - 1))


def model_spec_for(cfg: Config, ds: SegmentationDataset) -> ModelSpec:
    classes = ClassMap.for_classes(ds.classes, cfg.model.head)
    spec = ModelSpec(arch=cfg.model.arch, encoder=cfg.model.encoder, classes=classes.channel_names, head=classes.head,
                     tile=cfg.model.tile, overlap=cfg.model.overlap, threshold=cfg.model.threshold,
                     stitch=cfg.validation.stitch,
                     arch_kwargs=dict(cfg.model.arch_kwargs), encoder_kwargs=dict(cfg.model.encoder_kwargs))
    validate_tile(spec.tile, spec.stride, model_name=f"{spec.arch}/{spec.encoder}")
    if cfg.sampling.crop % spec.stride:
        raise DefectscanError(f"config 'sampling.crop': {cfg.sampling.crop} is not a multiple of the model's "
                              f"stride {spec.stride}")
    return spec


def prepare_data(cfg: Config, log: Log) -> tuple[SegmentationDataset, Splits, list]:
    if not cfg.data.root:
        raise DefectscanError("no dataset: give --data DIR or set data.root in the config")
    ds = load_dataset(cfg.data.root, cfg.data.format, cfg.data.classes)
    ds.require_usable()
    splits = split_dataset(ds, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    log(f"dataset {ds.root} ({ds.format}): {len(ds.samples)} images, {len(ds.labeled)} labeled, "
        f"{len(ds.unlabeled)} unlabeled; classes {', '.join(ds.classes[1:])}; {splits.summary()}")
    dc = cfg.data
    budget = dc.labeled is not None or dc.labeled_fraction is not None
    splits, train = label_budget(splits, dc.labeled, dc.labeled_fraction, dc.subset_seed, dc.val_fraction,
                                 dc.split_seed)
    log(f"label budget {len(train) + len(splits.val)}: training on {len(train)}, validating on {len(splits.val)}"
        if budget else f"training on {len(train)} labeled image(s), validating on {len(splits.val)}")
    if not any(s.has_defect for s in train):
        log("warning: no training image contains a defect; the model can only learn background")
    return ds, splits, train


# training.pick_epoch auto: with fewer validation images the last epoch is kept. Replaying k-image validation sets
# on a 49-image one (scripts/epoch_selection.py; README, "Which epoch"), picking by k images scored 0.037 IoU below
# the last epoch at k=1, 0.013 at k=3, 0.009 at k=5 and 0.004 at k=10 on the other images.
PICK_MIN_IMAGES = 10
PSEUDO_SEED_OFFSET = 1_000_003
VALIDATION_IMAGE_KEYS = ("image", "gt_defect_px", "tp_px", "fp_px", "fn_px")


def _metric_row(m: Evaluation, select: str) -> tuple[float | None, dict[str, Any]]:
    s = m.metrics()
    row = {"val_mean_iou": s.mean_iou, "val_mean_dice": s.mean_dice, "val_defect_ap": s.defect_pixel_ap}
    row.update({f"val_iou_{c}": v for c, v in s.iou.items() if c != m.classes[0]})
    return (s.mean_iou if select == "iou" else s.mean_dice), row


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, log: Log = print,
          progress_factory: Callable[[str, int], Callable[[int, dict], None]] | None = None,
          shard: Shard = SINGLE) -> TrainResult:
    """Train as configured into `run_dir`. `progress_factory(description, total)` returns an update callback.
    With a `shard` of several processes, rank 0 checks, locks, logs and writes the run directory; the others
    only compute (and read the directory's state on --resume)."""
    run = RunDir(run_dir)
    stack = contextlib.ExitStack()
    if not shard.is_main:
        log, progress_factory = (lambda message: None), None

    def check_directory() -> None:
        if shard.is_main:
            run.check_can_start(cfg, resume)

    check_directory()
    if resume and shard.is_main:  # the directory exists: hold it for the whole run
        stack.enter_context(run.locked())
    log_file = None
    pending: list[str] = []

    def say(msg: str, *, step_line: bool = False) -> None:
        if not shard.is_main:
            return
        if not (step_line and progress_factory is not None):  # a progress bar already shows the steps
            log(msg)
        line = time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n"
        if log_file is None:  # nothing is written before the run's setup has succeeded
            pending.append(line)
        else:
            log_file.write(line)
            log_file.flush()

    def open_log() -> None:
        nonlocal log_file
        if not shard.is_main:
            return
        if not resume:  # the first write: from here this process owns the directory
            stack.enter_context(run.locked())
            check_directory()  # a run that started beside this one may have filled it meanwhile
        log_file = run.open_log()
        log_file.writelines(pending)

    with stack:
        try:
            return _train(cfg, run, resume, say, open_log, progress_factory, shard)
        finally:
            if log_file is not None:
                log_file.close()


def _train(cfg: Config, run: RunDir, resume: bool, say: Log, open_log: Callable[[], None],
           progress_factory, shard: Shard) -> TrainResult:
    t_start = time.perf_counter()
    if resume and not run.has_state():
        say("no finished epoch to resume from: starting the run from the beginning")
        resume = False
    tc, sc, oc = cfg.training, cfg.sampling, cfg.optim
    if sc.batch_size % shard.world:
        raise DefectscanError(f"sampling.batch_size {sc.batch_size} cannot be split equally over {shard.world} "
                              f"processes: make it a multiple of {shard.world}")
    ds, splits, train_samples = prepare_data(cfg, say)
    spec = model_spec_for(cfg, ds)
    device = resolve_device(tc.device)
    amp_dtype = resolve_amp(tc.amp, device)
    exact_float32(device, amp_dtype)
    say(f"device {device} ({hardware()}), {precision_name(amp_dtype)}"
        + (f"; {shard.world} processes, {sc.batch_size // shard.world} crops each per step" if shard.world > 1 else ""))
    if note := emulated_bf16_note(device, amp_dtype):
        say(f"warning: {note}")
    loss_fn = build_loss(cfg.loss, spec.head, len(spec.classes))
    augment = build_augment(cfg.augment)
    torch.manual_seed(tc.seed)
    # channels-last: 1.13-1.52x per float32 training step on a CPU for every encoder measured (ResNet-34, Lite0,
    # Swin-T, ViTAE-T-win; README "Training step speed"), and the usual layout on CUDA
    model = build_model(spec, encoder_weights=None if resume else cfg.model.encoder_weights).to(
        device, memory_format=torch.channels_last)
    if cfg.model.init_checkpoint and not resume:  # fine-tuning: every weight from an earlier run
        start, _, _ = load_checkpoint(cfg.model.init_checkpoint, expect=spec)
        match_state_dict(model, start.state_dict(), source=cfg.model.init_checkpoint)
        say(f"starting from the weights of {cfg.model.init_checkpoint}")
    open_log()
    if not resume and shard.is_main:
        run.write_config(cfg)
        run.write_splits(splits.source, [s.stem for s in train_samples],
                         {s.stem for s in splits.train} - {s.stem for s in train_samples},
                         [s.stem for s in splits.val], [s.stem for s in splits.test])

    complete = False
    opt = build_optimizer(model, oc)
    ema = weight_average(model, tc.ema) if tc.ema else None
    kept = ema.module if ema else model  # what validation scores and the checkpoints hold
    progress_state = {"epoch": 0, "best_metric": None, "best_epoch": 0, "bad_validations": 0, "history": [],
                      "seconds": 0.0}
    if resume:
        saved = run.load_state()
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError:
            raise DefectscanError(f"{run.path}: saved state does not fit {spec.arch}/{spec.encoder}") from None
        opt.load_state_dict(saved["optimizer"])
        if ema:  # training.ema cannot change on resume: the saved config decides
            if "averaged" not in saved:
                raise DefectscanError(f"{run.path}: the saved state has no averaged weights (training.ema)")
            ema.module.load_state_dict(saved["averaged"])
        progress_state = saved["progress"]
        done, planned = progress_state["epoch"], run.read_config().training.epochs
        stopped = bool(tc.early_stop) and progress_state["bad_validations"] >= tc.early_stop
        if tc.epochs < done:
            raise DefectscanError(f"{run.path}: the run has already trained {done} epochs; --epochs {tc.epochs} "
                                  "cannot undo them")
        complete = (done >= tc.epochs) or (stopped and tc.epochs == planned)
        if complete:
            how = "stopped early" if done < tc.epochs else "complete"
            say(f"the run is {how} ({done} of {tc.epochs} epochs); nothing to train. To train longer: "
                f"defectscan train --resume {run.path} --epochs N (N > {done})")
        elif planned != tc.epochs:
            progress_state["bad_validations"] = 0  # an extended run gets its patience back
            say(f"extending the run from {planned} to {tc.epochs} epochs: the learning rate follows the longer "
                f"schedule from step {done * sc.steps_per_epoch} on")
            if shard.is_main:
                run.write_config(cfg)
        if not complete:
            say(f"resuming after epoch {done}")

    def counter(description: str, total: int) -> Callable[[int, int], None] | None:
        """A (done, total) progress callback for the loops that report no extra values."""
        if progress_factory is None:
            return None
        update = progress_factory(description, total)
        return lambda done, _total: update(done, {})

    def validate(net: torch.nn.Module, net_spec: ModelSpec, samples: list, description: str) -> Evaluation:
        """Validation metrics through the same `Predictor` path as `infer` and `evaluate` (no previews, no cost)."""
        vc = cfg.validation
        opts = EvalOptions(stitch=vc.stitch, batch_size=vc.batch_size, amp=tc.amp, min_area=vc.min_area,
                           seam_images=0, examples=0, cost=False)
        predictor = Predictor(net, net_spec, opts.infer_options())
        return evaluate(predictor, ds, samples, opts, progress=counter(description, len(samples)), shard=shard)

    if not complete:  # a finished run resumed has nothing to train: its images need not be decoded
        pseudo = None
        if cfg.data.pseudo_labels:
            labeled_stems = [s.stem for s in splits.train + splits.val + splits.test]
            pseudo = load_pseudolabels(cfg.data.pseudo_labels, ds, exclude=labeled_stems)
        mode = choose_mode(cfg.data.cache, train_samples + (pseudo.samples if pseudo else []))
        if mode == "disk":
            say(f"training images memory-mapped from the decode cache {cache_root()} (data.cache: {cfg.data.cache})")
        images, masks = load_training_pairs(ds, train_samples, mode, counter("loading images", len(train_samples)))
        groups = [s.group for s in train_samples]
        crops = CropDataset(images, masks, len(ds.classes), sc.crop, sc.defect_share, tc.seed, augment,
                            scale=tuple(sc.scale), groups=groups, balance_groups=sc.balance_groups)
        if crops.image_weight is not None:  # balance_groups > 0 and more than one group
            say(f"sampling.balance_groups {sc.balance_groups:g}: crops by image group " + ", ".join(
                f"{g} ({n} images) {share:.0%}" for g, (n, share) in group_shares(groups, crops.image_weight).items()))
        if sc.defect_share == "auto":
            say(f"sampling.defect_share auto: {crops.defect_share:.3f} of the crops centred on a defect pixel")
        if pseudo is not None:
            pseudo_images = load_images(ds, pseudo.samples, mode,
                                        counter("loading pseudo-labeled images", len(pseudo.samples)))
            for image, mask, sample in zip(pseudo_images, pseudo.masks, pseudo.samples):
                if image.shape[:2] != mask.shape:
                    raise DefectscanError(f"data.pseudo_labels {cfg.data.pseudo_labels}: mask of '{sample.stem}' "
                                          f"is {mask.shape[1]}x{mask.shape[0]}, its image {image.shape[1]}x"
                                          f"{image.shape[0]}")
            # a seed of their own: pseudo crop i is not cut at labeled crop i's window
            extra = CropDataset(pseudo_images, pseudo.masks, len(ds.classes), sc.crop, sc.defect_share,
                                tc.seed + PSEUDO_SEED_OFFSET, augment, scale=tuple(sc.scale),
                                groups=[s.group for s in pseudo.samples], balance_groups=sc.balance_groups)
            crops = MixedCrops(crops, extra, sc.pseudo_share, tc.seed)
            ignored = float(np.mean([r["ignored_share"] for r in pseudo.manifest["images"]]))
            say(f"self-training: {len(pseudo.samples)} pseudo-labeled image(s) from {cfg.data.pseudo_labels} "
                f"(teacher threshold {pseudo.manifest['threshold']:.3f}, {ignored:.3%} of their pixels ignored), "
                f"{sc.pseudo_share:.0%} of the crops; {extra.defect_share:.3f} of those centred on a defect pixel")
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    total_steps = tc.epochs * sc.steps_per_epoch
    warmup = int(round(oc.warmup_epochs * sc.steps_per_epoch))
    if warmup >= total_steps:
        say(f"warning: the warm-up ({oc.warmup_epochs} epochs) is not shorter than the run ({tc.epochs} epochs): the "
            f"learning rate never reaches optim.lr; lower optim.warmup_epochs")
    pin = device.type == "cuda"
    workers = loader_workers(sc.workers, device, processes_on_this_node())
    if sc.workers == "auto" and workers:
        say(f"sampling.workers auto: {workers} DataLoader processes make the crops while the GPU trains")
    history: list[dict] = progress_state["history"]
    keep_last = tc.pick_epoch == "last" or (tc.pick_epoch == "auto" and len(splits.val) < PICK_MIN_IMAGES)
    if splits.val and keep_last:
        say(f"the last epoch becomes the best checkpoint (training.pick_epoch {tc.pick_epoch}"
            + (f": {len(splits.val)} validation image(s), fewer than {PICK_MIN_IMAGES}" if tc.pick_epoch == "auto"
               else "") + ")")
    if ema:
        say(f"training.ema {tc.ema}: validation and the checkpoints use the moving average of the weights")
    net = _distributed(model, device, shard, say)  # what the training steps call; `model` is what is saved

    for epoch in range(tc.epochs + 1 if complete else progress_state["epoch"] + 1, tc.epochs + 1):
        t_epoch = time.perf_counter()
        torch.manual_seed(tc.seed * 100_003 + epoch)  # dropout/drop-path draws depend on the epoch only
        first = (epoch - 1) * sc.steps_per_epoch
        loader = torch.utils.data.DataLoader(
            crops, batch_size=sc.batch_size // shard.world,
            sampler=IndexRange(first * sc.batch_size, (first + sc.steps_per_epoch) * sc.batch_size, sc.batch_size,
                               shard.rank, shard.world),
            num_workers=workers, pin_memory=pin, persistent_workers=False)
        update = progress_factory(f"epoch {epoch}/{tc.epochs}", sc.steps_per_epoch) if progress_factory else None
        model.train()
        losses = []
        for k, (x, y) in enumerate(loader):
            step = first + k
            lr = lr_at(step, total_steps, warmup, oc.lr, oc.min_lr_ratio)
            set_lr(opt, lr)
            x = x.to(device, non_blocking=pin).float().div_(255).sub_(mean).div_(std)
            x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=pin)
            with autocast(device, amp_dtype):
                logits = net(x)
            loss = loss_fn(logits, y)
            losses.append(optimizer_step(loss, model, opt, scaler, oc.clip_grad, f"epoch {epoch} step {k + 1}"))
            if ema:
                ema.update(model, step=step + 1)
            if update:
                update(k + 1, {"loss": float(np.mean(losses[-20:])), "lr": lr})
            if tc.log_every and (k + 1) % tc.log_every == 0 and k + 1 < sc.steps_per_epoch:
                say(step_line(epoch, tc.epochs, k, sc.steps_per_epoch, losses[-tc.log_every:], lr, t_epoch,
                              total_steps - step - 1) + " (training steps only)", step_line=True)
        if shard.world > 1:  # every process's mean loss (equal parts of each batch): the epoch's mean
            losses = [loss for part in shard.gather(losses) for loss in part]
        row: dict[str, Any] = {"epoch": epoch, "step": first + sc.steps_per_epoch, "lr": round(lr, 8),
                               "train_loss": round(float(np.mean(losses)), 5),
                               "train_seconds": round(time.perf_counter() - t_epoch, 1)}
        improved = False
        val_scores = m = None
        if splits.val and (epoch % tc.val_every == 0 or epoch == tc.epochs):
            m = validate(kept, spec, splits.val, "validation")
            val_scores = validation_scores(m.image_hists)  # kept with a best checkpoint: its threshold comes from it
            metric, vals = _metric_row(m, tc.select)
            row.update(vals)
            # the epoch at the threshold it would be deployed with: IoU at model.threshold swings with calibration
            choice = _threshold_choice(cfg, m.image_hists)
            if choice is not None:
                row.update(val_threshold=round(choice.threshold, 4), val_defect_iou_at_threshold=round(choice.iou, 4))
            # each image's pixel counts per epoch: what shows how reliably a validation set of a few images picks
            # an epoch (scripts/epoch_selection.py); kept in the resumable state like the history
            progress_state.setdefault("validation_images", []).extend(
                {"epoch": epoch, **{k: r[k] for k in VALIDATION_IMAGE_KEYS}} for r in m.per_image)
            row["val_seconds"] = round(m.seconds, 1)
            best = progress_state["best_metric"]
            # keep_last: the validation pass still gives the curves and the last epoch's threshold
            improved = keep_last or (metric is not None and (best is None or metric > best))
            if improved:
                progress_state.update(best_metric=metric, best_epoch=epoch, bad_validations=0)
            else:
                progress_state["bad_validations"] += 1
        elif not splits.val:
            improved = True  # without a validation split the latest weights are the best we know
            progress_state["best_epoch"] = epoch
        history.append(row)
        progress_state["epoch"] = epoch
        progress_state["seconds"] += time.perf_counter() - t_epoch
        extra = {"run": str(run.path.name), "epoch": epoch, "metrics": row, "dataset": str(ds.root),
                 "train_images": len(train_samples), "precision": precision_name(amp_dtype)}
        half = tc.half_checkpoints
        if shard.is_main:
            if improved:
                best_extra = {**extra, "validation_scores": val_scores} if val_scores else extra
                save_checkpoint(kept, spec, run.checkpoint_stem("best"), half=half, extra=best_extra)
            save_checkpoint(kept, spec, run.checkpoint_stem("last"), half=half, extra=extra)
            if m is not None:
                run.write_validation_scores(epoch, [r["image"] for r in m.per_image], m.image_hists)
            run.save_state(model, opt, progress_state, ema.module if ema else None)  # last: resume starts here
            run.write_history(history, progress_state.get("validation_images", []))
        say(f"epoch {epoch}/{tc.epochs} loss {row['train_loss']:.4f}"
            + (f" val mIoU {row['val_mean_iou']} mDice {row['val_mean_dice']} AP {row['val_defect_ap']}"
               if "val_mean_iou" in row else "")
            + (" (best)" if improved and splits.val else "") + f" [{row['train_seconds']}s]")
        if tc.early_stop and progress_state["bad_validations"] >= tc.early_stop:
            say(f"early stop: no improvement in {tc.early_stop} validation(s)")
            break

    if shard.is_main:
        _choose_threshold(cfg, run, len(splits.val), say)
    shard.barrier()  # the best checkpoint and its threshold are on disk for every process
    test = None
    if splits.test and cfg.validation.test and not (complete and run.has_test_metrics()):
        best_model, best_spec, _ = load_checkpoint(run.checkpoint("best"))
        m = validate(best_model.to(device), best_spec, splits.test, "test")
        metrics = m.metrics().model_dump(mode="json", exclude={"cost"})  # no cost measured during training
        test = {"epoch": progress_state["best_epoch"], **metrics, "per_image": m.per_image}
        if shard.is_main:
            run.write_test_metrics(test)
        say(f"test ({len(splits.test)} images, best epoch {progress_state['best_epoch']}): mIoU {test['mean_iou']} "
            f"mDice {test['mean_dice']} defect pixel AP {test['defect_pixel_ap']}")
    seconds = time.perf_counter() - t_start
    return TrainResult(run.path, progress_state["best_epoch"], progress_state["best_metric"], progress_state["epoch"],
                       seconds, test)


def _distributed(model: torch.nn.Module, device: torch.device, shard: Shard, say: Log) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel for a sharded run (itself for one process). On GPUs batch norm
    becomes SyncBatchNorm (statistics over the global batch); torch has no CPU SyncBatchNorm, so on CPUs each
    process normalises over its own part of the batch: a BN-free model (e.g. model.encoder_kwargs
    {norm_layer: groupnorm1} and model.arch_kwargs {decoder_use_norm: false}) trains as one process would."""
    if shard.world == 1:
        return model
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, shared statistics
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    if has_bn:
        say(f"note: batch norm on CPUs normalises over each process's {shard.world}th of a batch (no CPU "
            f"SyncBatchNorm); results differ from one process")
    return torch.nn.parallel.DistributedDataParallel(model)


def _threshold_choice(cfg: Config, images: list[ScoreHistogram], rule: str | None = None) -> ThresholdChoice | None:
    """The threshold `validation.threshold` (or `rule`) picks on these per-image histograms; None for `fixed` or
    when they hold no defect pixel."""
    vc = cfg.validation
    if vc.threshold == "fixed" or not any(h.pos.any() for h in images):
        return None
    return choose_threshold(images, rule or vc.threshold, vc.threshold_target, default=cfg.model.threshold,
                            tolerance=vc.threshold_tolerance)


def _choose_threshold(cfg: Config, run: RunDir, val_images: int, say: Log) -> None:
    """Set the best checkpoint's decision threshold by `validation.threshold`, from the pixel score histogram of
    the validation pass that made it the best (stored beside it, so a resumed run chooses the same)."""
    vc = cfg.validation
    if vc.threshold == "fixed":
        return
    if not val_images:
        say(f"threshold: no validation split to choose it on ({vc.threshold}); keeping model.threshold "
            f"{cfg.model.threshold}")
        return
    path = run.checkpoint("best")
    meta = read_sidecar(path)
    extra = meta.get("extra", {})
    chosen = extra.get("threshold")
    if chosen and chosen.get("rule") == vc.threshold and chosen.get("target") == vc.threshold_target:
        return  # chosen before this run was resumed
    if "validation_scores" not in extra:
        say("threshold: the best checkpoint has no validation scores (made before thresholds were chosen); "
            f"keeping {meta['model']['threshold']}")
        return
    images, pooled_only = read_validation_scores(extra["validation_scores"])
    rule = "best_f1" if pooled_only and vc.threshold == "stable_f1" else vc.threshold  # made before per-image scores
    choice = _threshold_choice(cfg, images, rule)
    if choice is None:
        say(f"threshold: the validation images hold no defect pixels to choose it on; keeping model.threshold "
            f"{cfg.model.threshold}")
        return
    set_threshold(path, choice.threshold, {**choice.to_dict(), "split": "validation", "images": val_images,
                                           "previous": meta["model"]["threshold"], "default": cfg.model.threshold})
    say(f"threshold {choice.threshold:.4f} chosen on {val_images} validation image(s) by {rule}"
        + (f" {vc.threshold_target}" if vc.threshold_target else "")
        + f": pixel precision {choice.precision:.3f}, recall {choice.recall:.3f}, F1 {choice.f1:.3f}"
        + (f" ({choice.note})" if choice.note else ""))
