"""Loss terms from `segmentation_models_pytorch.losses`, combined by weight, for the model's head.

`bce` and `ce` both mean the cross-entropy that fits the head (binary per channel for sigmoid, categorical for
softmax), so one config works for binary and multi-class data. Modes: `binary` (sigmoid, one defect class),
`multilabel` (sigmoid, several classes, one channel each) and `multiclass` (softmax, channel 0 = background).
Targets always arrive as class-index masks (B, H, W); pixels at `IGNORE_INDEX` (uncertain pseudo-labels) are
taken out of every term at once: they become background predicted as background with certainty, so they add
nothing to a Dice/Jaccard/Tversky overlap, no gradient anywhere, and only their count to the denominator of the
mean cross-entropy and focal terms (as smp's own `ignore_index` does).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from segmentation_models_pytorch import losses as L

from defectscan.data.dataset import IGNORE_INDEX
from defectscan.errors import DefectscanError
from defectscan.training.config import LossTerm

LOSS_NAMES = ("dice", "bce", "ce", "focal", "lovasz", "tversky", "jaccard")
IGNORED_LOGIT = 30.0  # sigmoid(-30) ~ 1e-13: an ignored pixel's loss and gradient vanish in float32


def loss_mode(head: str, num_outputs: int) -> str:
    if head == "softmax":
        return "multiclass"
    return "binary" if num_outputs == 1 else "multilabel"


def _make(term: LossTerm, mode: str, num_outputs: int) -> torch.nn.Module:
    p = dict(term.params)
    name = term.name.lower()
    try:
        if name in ("dice", "tversky", "jaccard"):
            cls = {"dice": L.DiceLoss, "tversky": L.TverskyLoss, "jaccard": L.JaccardLoss}[name]
            if mode == "multiclass":
                p.setdefault("classes", list(range(1, num_outputs)))  # overlap of the defect classes only
            return cls(mode=mode, from_logits=True, **p)
        if name == "focal":
            return L.FocalLoss(mode=mode, **p)
        if name == "lovasz":
            return L.LovaszLoss(mode=mode, from_logits=True, **p)
        if name in ("bce", "ce"):  # cross-entropy of the head: per-channel binary, or categorical for softmax
            if mode == "multiclass":
                p.setdefault("smooth_factor", 0.0)  # smp's default None fails inside the loss
                return L.SoftCrossEntropyLoss(**p)
            return L.SoftBCEWithLogitsLoss(**p)
    except TypeError as exc:
        raise DefectscanError(f"loss '{term.name}': bad params {p} ({exc})") from None
    raise DefectscanError(f"unknown loss '{term.name}' (available: {', '.join(LOSS_NAMES)})")


def build_loss(terms: Sequence[LossTerm], head: str, num_outputs: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function (logits (B, C, H, W), class-index target (B, H, W)) -> scalar loss."""
    mode = loss_mode(head, num_outputs)
    parts = [(term.weight, _make(term, mode, num_outputs)) for term in terms]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in float32 even under autocast
        ignored = target == IGNORE_INDEX
        if bool(ignored.any()):
            target = target.masked_fill(ignored, 0)
            certain = torch.full_like(logits, -IGNORED_LOGIT)  # sigmoid: every channel says "not this class"
            if mode == "multiclass":
                certain[:, 0] = IGNORED_LOGIT  # softmax: all of the probability on the background
            logits = torch.where(ignored.unsqueeze(1), certain, logits)
        if mode == "multiclass":
            y = target.long()
        else:  # one channel per defect class: channel k is class index k + 1
            classes = torch.arange(1, num_outputs + 1, device=target.device).view(1, -1, 1, 1)
            y = (target.unsqueeze(1) == classes).float()
        total = logits.new_zeros(())
        for weight, fn in parts:
            total = total + weight * fn(logits, y)
        return total

    return loss
