"""Self-supervised pretraining of an encoder on every image of a dataset, labeled or not (labels unused).

Method: masked image modelling through the segmentation network, one recipe for every encoder family. Random
square patches (`mask.patch` px, `mask.ratio` of them) of each crop are replaced by the normalised mean (zero),
the whole encoder-decoder network (`model.arch`, 3 output channels) predicts the normalised pixels, and the loss
is the L1 error on the hidden pixels only — SimMIM's objective (Xie et al., CVPR 2022: random 32-px patches, a
0.6 ratio, L1 on masked pixels, a light prediction head) with the segmentation decoder as the head, which is
how the encoder will be used afterwards. Why not one method per family: SparK (Tian et al., ICLR 2023) and
ConvNeXt-V2's FCMAE show that CNNs gain more from sparse convolutions that skip the hidden pixels, but those
need per-architecture surgery (sparse kernels for every conv and norm layer); hiding pixels at the input works
for CNN, Swin, ViTAE and ViT alike, so the comparison between families stays fair, and the README reports
whether each family's pretrained row beats its scratch row.

A run directory like training's (`RunDir`): config.yaml, last_state.pt (resume: on a CPU an interrupted run
continues to the same weights), metrics.csv + curves.png (loss per epoch), train.log, and at the end
`encoder.safetensors` + `encoder.json` (the encoder's state dict, loadable with `model.encoder_weights=PATH`) and
`reconstructions.png` (crops, what the encoder saw, what the network filled in).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from defectscan.data import load_dataset, split_dataset
from defectscan.data.dataset import SegmentationDataset
from defectscan.data.formats import detect_format
from defectscan.data.cache import cache_root, choose_mode, load_images
from defectscan.data.sampling import IndexRange
from defectscan.errors import DefectscanError
from defectscan.io.files import atomic_path, write_text
from defectscan.io.images import write_image
from defectscan.io.provenance import hardware, library_versions
from defectscan.models import ModelSpec, build_model, encoder_info
from defectscan.runtime import (autocast, emulated_bf16_note, exact_float32, precision_name, resolve_amp,
                                resolve_device)
from defectscan.training.config import PretrainConfig
from defectscan.training.loop import step_line
from defectscan.training.optim import build_optimizer, lr_at, optimizer_step, set_lr
from defectscan.training.rundir import RunDir

Log = Callable[[str], None]
ENCODER_FILE = "encoder"  # encoder.safetensors + encoder.json in the run directory
RECONSTRUCTIONS = "reconstructions.png"  # what the network fills in, for a look


@dataclass
class PretrainResult:
    run_dir: Path
    encoder_weights: Path
    epochs_run: int
    final_loss: float
    seconds: float


class MaskedCrops(torch.utils.data.Dataset):
    """Item i -> ((3, crop, crop) uint8 crop, (crop/patch, crop/patch) bool hidden patches), depending only on the
    seed and i (any worker, restart or resume sees the same data). Crops are uniform over all pixels of all
    images (an image is drawn by area), flipped and rotated by multiples of 90 degrees."""

    def __init__(self, images: list, crop: int, patch: int, ratio: float, seed: int) -> None:
        small = [k for k, im in enumerate(images) if min(im.shape[:2]) < crop]
        if small:
            raise DefectscanError(f"{len(small)} image(s) are smaller than the crop ({crop} px), e.g. image "
                                  f"{small[0]} ({images[small[0]].shape[1]}x{images[small[0]].shape[0]}); "
                                  f"lower sampling.crop")
        self.images, self.crop, self.patch, self.ratio, self.seed = images, crop, patch, ratio, seed
        areas = np.array([im.shape[0] * im.shape[1] for im in images], np.float64)
        self.area_p = areas / areas.sum()
        self.grid = crop // patch
        self.hidden = max(1, int(round(ratio * self.grid * self.grid)))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        k = int(rng.choice(len(self.images), p=self.area_p))
        h, w = self.images[k].shape[:2]
        y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
        crop = np.array(self.images[k][y : y + self.crop, x : x + self.crop])
        crop = np.rot90(crop, int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        hidden = np.zeros(self.grid * self.grid, bool)
        hidden[rng.choice(hidden.size, self.hidden, replace=False)] = True
        return (torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))),
                torch.from_numpy(hidden.reshape(self.grid, self.grid)))


def pretrain(cfg: PretrainConfig, run_dir: str | Path, *, resume: bool = False, log: Log = print,
             progress_factory: Callable[[str, int], Callable[[int, dict], None]] | None = None) -> PretrainResult:
    """Pretrain `cfg.model.encoder` on every image of `cfg.data.root` into `run_dir`; see the module docstring."""
    run = RunDir(run_dir)
    run.check_can_start(cfg, resume)
    if not cfg.data.root:
        raise DefectscanError("no dataset: give DATA or set data.root in the config")
    ds = _pretraining_images(Path(cfg.data.root), cfg.data.format)
    samples = ds.samples
    if cfg.data.exclude_test and ds.labeled:
        test = {s.stem for s in split_dataset(ds, 0.0, cfg.data.test_fraction, cfg.data.split_seed).test}
        samples = [s for s in samples if s.stem not in test]
        if not samples:
            raise DefectscanError(f"{ds.root}: every image is a test image; nothing left to pretrain on "
                                  f"(data.exclude_test: false uses them)")
    info = encoder_info(cfg.model.encoder)
    mc, sc, tc, oc = cfg.model, cfg.sampling, cfg.training, cfg.optim
    if sc.crop % info.stride:
        raise DefectscanError(f"config 'sampling.crop': {sc.crop} is not a multiple of {mc.encoder}'s stride "
                              f"{info.stride}")
    spec = ModelSpec(arch=mc.arch, encoder=mc.encoder, classes=("r", "g", "b"), head="sigmoid", tile=sc.crop,
                     overlap=0, encoder_kwargs=dict(mc.encoder_kwargs))
    device = resolve_device(tc.device)
    amp_dtype = resolve_amp(tc.amp, device)
    exact_float32(device, amp_dtype)
    torch.manual_seed(tc.seed)
    model = build_model(spec, encoder_weights=None if resume and run.has_state() else mc.init_weights).to(
        device, memory_format=torch.channels_last)
    opt = build_optimizer(model, oc)
    progress_state: dict[str, Any] = {"epoch": 0, "history": [], "seconds": 0.0}
    finished = resume and (run.path / RunDir.METRICS).is_file() and len(run.read_history()) >= tc.epochs
    # images are read (and crops checked against them) before anything is written: a bad dataset leaves no run
    crops = None if finished else _masked_crops(cfg, ds, samples, log, progress_factory)

    with run.locked():
        if resume and run.has_state():
            saved = run.load_state()
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            progress_state = saved["progress"]
        elif not resume:
            run.write_config(cfg)
        with run.open_log() as log_file:
            def say(msg: str, *, step_line: bool = False) -> None:
                if not (step_line and progress_factory is not None):
                    log(msg)
                log_file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
                log_file.flush()

            return _run(cfg, run, ds, samples, crops, spec, model, opt, device, amp_dtype, progress_state, say,
                        progress_factory)


def _labeled_among(ds: SegmentationDataset, samples: list) -> int:
    return len({s.stem for s in ds.labeled} & {s.stem for s in samples})


def _pretraining_images(root: Path, data_format: str) -> SegmentationDataset:
    """The dataset's images, labeled or not; a folder in no annotated layout counts as plain images."""
    if data_format == "auto" and root.is_dir():
        try:
            data_format = detect_format(root)
        except DefectscanError:
            data_format = "images"
    return load_dataset(root, data_format)


def _masked_crops(cfg: PretrainConfig, ds, samples, log: Log, progress_factory) -> MaskedCrops:
    mode = choose_mode(cfg.data.cache, samples)
    if mode == "disk":
        log(f"images memory-mapped from the decode cache {cache_root()}")
    update = progress_factory("loading images", len(samples)) if progress_factory else None
    images = load_images(ds, samples, mode, (lambda d, n: update(d, {})) if update else None)
    return MaskedCrops(images, cfg.sampling.crop, cfg.mask.patch, cfg.mask.ratio, cfg.training.seed)


def _run(cfg: PretrainConfig, run: RunDir, ds, samples, crops: MaskedCrops | None, spec: ModelSpec, model, opt,
         device, amp_dtype, progress_state: dict, say: Log, progress_factory) -> PretrainResult:
    mc, sc, tc, oc = cfg.model, cfg.sampling, cfg.training, cfg.optim
    t_start = time.perf_counter()
    done = progress_state["epoch"]
    labeled = _labeled_among(ds, samples)
    left_out = len(ds.samples) - len(samples)
    say(f"pretraining {mc.encoder} ({mc.arch} decoder as the reconstruction head) on {len(samples)} images of "
        f"{ds.root} ({labeled} labeled, {len(samples) - labeled} unlabeled; labels unused"
        + (f"; {left_out} test images left out (data.exclude_test)" if left_out else "")
        + f"); device {device} ({hardware()}), {precision_name(amp_dtype)}"
        + (f"; resuming after epoch {done}" if done else ""))
    if note := emulated_bf16_note(device, amp_dtype):
        say(f"warning: {note}")
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    total = tc.epochs * sc.steps_per_epoch
    warmup = int(round(oc.warmup_epochs * sc.steps_per_epoch))
    history: list[dict] = progress_state["history"]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # float16 on CUDA only
    for epoch in range(done + 1, tc.epochs + 1):
        t_epoch = time.perf_counter()
        torch.manual_seed(tc.seed * 100_003 + epoch)  # drop-path draws depend on the epoch only
        first = (epoch - 1) * sc.steps_per_epoch
        loader = torch.utils.data.DataLoader(crops, batch_size=sc.batch_size, num_workers=0,
                                             sampler=IndexRange(first * sc.batch_size,
                                                                (first + sc.steps_per_epoch) * sc.batch_size))
        update = progress_factory(f"epoch {epoch}/{tc.epochs}", sc.steps_per_epoch) if progress_factory else None
        model.train()
        losses = []
        for k, (x, hidden) in enumerate(loader):
            step = first + k
            lr = lr_at(step, total, warmup, oc.lr, oc.min_lr_ratio)
            set_lr(opt, lr)
            target, keep = masked_batch(x, hidden, cfg.mask.patch, mean, std)
            inputs = (target * keep).contiguous(memory_format=torch.channels_last)  # hidden = the mean (zero)
            with autocast(device, amp_dtype):
                pred = model(inputs)
            err = (pred.float() - target).abs() * (1.0 - keep)
            loss = err.sum() / ((1.0 - keep).sum() * target.shape[1]).clamp_min(1.0)
            losses.append(optimizer_step(loss, model, opt, scaler, oc.clip_grad, f"epoch {epoch} step {k + 1}"))
            if update:
                update(k + 1, {"loss": float(np.mean(losses[-20:])), "lr": lr})
            if tc.log_every and (k + 1) % tc.log_every == 0 and k + 1 < sc.steps_per_epoch:
                say(step_line(epoch, tc.epochs, k, sc.steps_per_epoch, losses[-tc.log_every:], lr, t_epoch,
                              total - step - 1), step_line=True)
        row = {"epoch": epoch, "step": first + sc.steps_per_epoch, "lr": round(lr, 8),
               "train_loss": round(float(np.mean(losses)), 5),
               "train_seconds": round(time.perf_counter() - t_epoch, 1)}
        history.append(row)
        progress_state.update(epoch=epoch, seconds=progress_state["seconds"] + row["train_seconds"])
        run.save_state(model, opt, progress_state)
        run.write_history(history)
        say(f"epoch {epoch}/{tc.epochs} masked-pixel L1 {row['train_loss']:.4f} [{row['train_seconds']}s]")
    if crops is not None:
        write_image(run.path / RECONSTRUCTIONS, reconstructions(model, crops, mean, std, cfg.mask.patch))
    weights = save_encoder(model.encoder, run.path / ENCODER_FILE, {
        "encoder": mc.encoder, "method": "masked image modelling (SimMIM objective, segmentation decoder as head)",
        "arch": mc.arch, "mask": cfg.mask.model_dump(), "crop": sc.crop, "steps": total,
        "images": len(samples), "labeled": labeled, "test_images_left_out": left_out, "data": str(ds.root), "init_weights": mc.init_weights,
        "final_loss": history[-1]["train_loss"] if history else None, "seconds": round(progress_state["seconds"], 1),
        "precision": precision_name(amp_dtype), "hardware": hardware(), "versions": library_versions()})
    say(f"encoder weights: {weights} (train with --set model.encoder={mc.encoder} "
        f"--set model.encoder_weights={weights})")
    return PretrainResult(run.path, weights, progress_state["epoch"], history[-1]["train_loss"] if history else math.nan,
                          time.perf_counter() - t_start)


def masked_batch(x: torch.Tensor, hidden: torch.Tensor, patch: int, mean: torch.Tensor,
                 std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) uint8 crops and (B, H/patch, W/patch) hidden patches -> (normalised target, keep), keep being
    (B, 1, H, W) float: 1 where the encoder sees the pixel, 0 in hidden patches. On the device of `mean`."""
    target = x.to(mean.device).float().div_(255).sub_(mean).div_(std)
    keep = 1.0 - hidden.to(mean.device).float().repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
    return target, keep


@torch.no_grad()
def reconstructions(model: torch.nn.Module, crops: MaskedCrops, mean: torch.Tensor, std: torch.Tensor, patch: int,
                    count: int = 4) -> np.ndarray:
    """RGB picture, one row per crop: the crop, what the encoder saw (hidden patches grey), the network's
    reconstruction, and the reconstruction inside the hidden patches pasted into the visible pixels."""
    was_training = model.training
    model.eval()
    rows = []
    for i in range(count):
        x, hidden = crops[2**40 + i]  # crops no training step drew
        target, keep = masked_batch(x[None], hidden[None], patch, mean, std)
        pred = model((target * keep).contiguous(memory_format=torch.channels_last)).float()
        to_u8 = lambda t: (t * std + mean).mul(255).clamp(0, 255).byte()[0].permute(1, 2, 0).cpu().numpy()  # noqa: E731
        seen = (target * keep).clone()
        seen[:, :, keep[0, 0] == 0] = ((0.5 - mean) / std).view(-1, 1)  # hidden = mid grey in the picture
        pasted = target * keep + pred * (1 - keep)
        gap = np.full((x.shape[1], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([to_u8(target), gap, to_u8(seen), gap, to_u8(pred), gap, to_u8(pasted)], axis=1))
    model.train(was_training)
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([r for row in rows for r in (row, sep)][:-1], axis=0)


def encoder_files(run_dir: Path) -> tuple[Path, Path]:
    """(encoder weights, their JSON sidecar) that a finished pretraining in `run_dir` holds."""
    stem = Path(run_dir) / ENCODER_FILE
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_encoder(encoder: torch.nn.Module, stem: Path, meta: dict) -> Path:
    """`<stem>.safetensors` (the encoder's state dict, as `model.encoder_weights` loads it) and `<stem>.json`,
    both written atomically."""
    from safetensors.torch import save_file

    weights = stem.with_suffix(".safetensors")
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(tmp),
                  metadata={"format": "defectscan-encoder"})
    write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return weights
