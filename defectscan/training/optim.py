"""Optimizer, parameter groups and learning-rate schedule (shared by `train` and `pretrain`); weight averaging.

Pretrained encoders are fine-tuned more gently than the freshly initialised decoder: `optim.encoder_lr_scale`
multiplies the encoder's rate, and `optim.layer_decay` (< 1) lowers it further towards the input, block group by
block group (layer-wise lr decay, as in BEiT / MAE fine-tuning). Biases, normalisation weights and position
embeddings get no weight decay (the usual AdamW practice; decaying a LayerNorm gain towards 0 only hurts).
"""

from __future__ import annotations

import math
import re

import torch

from defectscan.errors import DefectscanError

_NO_DECAY_NAMES = ("pos_embed", "relative_position_bias_table", "cls_token", "absolute_pos_embed")


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to base * min_ratio at the last step."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def block_key(name: str) -> str:
    """The block group a parameter belongs to: its name up to the first numeric component ('layer1.0.conv1.weight'
    -> 'layer1.0', 'model.blocks.3.2.conv.weight' -> 'model.blocks.3'), else its module ('conv1.weight' -> 'conv1'),
    so a ResNet-34 has 18 groups (stem modules and blocks), EfficientNet-Lite0 9 (stem modules and stages), a ViT-S 12 blocks plus stem,
    norm and pyramid. Groups are
    ordered by first appearance, which for every encoder here is input to output."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit() or re.fullmatch(r"[a-z_]+_\d+", p):  # timm feature wrappers name stages 'layers_0'
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name  # a stem module: 'model.conv_stem.weight' -> 'model.conv_stem'


def param_groups(model: torch.nn.Module, *, weight_decay: float, encoder_lr_scale: float = 1.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups, each with an `lr_scale` the schedule multiplies its rate by.

    The encoder (`model.encoder`, smp's layout) gets `encoder_lr_scale * layer_decay ** (G - 1 - g)` for its
    block group g of G; everything else (decoder, head) the full rate."""
    encoder = getattr(model, "encoder", None)
    enc_params = {id(p): n for n, p in encoder.named_parameters()} if encoder is not None else {}
    if (encoder_lr_scale != 1.0 or layer_decay != 1.0) and not enc_params:
        raise DefectscanError("optim.encoder_lr_scale / optim.layer_decay need a model with an encoder")
    order: dict[str, int] = {}
    for n, p in (encoder.named_parameters() if encoder is not None else ()):
        if p.requires_grad:
            order.setdefault(block_key(n), len(order))
    groups: dict[tuple[float, bool], list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if id(p) in enc_params:
            depth = order[block_key(enc_params[id(p)])]
            scale = encoder_lr_scale * layer_decay ** (len(order) - 1 - depth)
        decay = p.ndim > 1 and not any(k in n for k in _NO_DECAY_NAMES)
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": weight_decay if d else 0.0}
            for (s, d), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


def build_optimizer(model: torch.nn.Module, oc) -> torch.optim.AdamW:
    """AdamW over `param_groups` from an `optim` config section."""
    return torch.optim.AdamW(param_groups(model, weight_decay=oc.weight_decay, encoder_lr_scale=oc.encoder_lr_scale,
                                          layer_decay=oc.layer_decay), lr=oc.lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, clip_grad: float, where: str) -> float:
    """One update from `loss` (refused when not finite), with float16 loss scaling and gradient-norm clipping
    (`clip_grad` 0: none); returns the loss value."""
    if not torch.isfinite(loss):
        raise DefectscanError(f"{where}: loss is {loss.item()}; lower optim.lr")
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(opt)
    scaler.update()
    return loss.item()


EMA_WARMUP_POWER = 2 / 3  # timm's default: the average spans ~step^(2/3) steps (~100 of the last 1000)


def weight_average(model: torch.nn.Module, decay: float):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm statistics included), updated
    with `.update(model, step)` after every optimizer step, as `timm.utils.ModelEmaV3` (`.module` is the averaged
    network). Its decay at step t is min(`decay`, 1 - t^-2/3): 0.954 after 100 steps, 0.990 after 1000, 0.999
    after 31.6k, so a short run averages over its last tenth or so instead of remembering its first weights."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
