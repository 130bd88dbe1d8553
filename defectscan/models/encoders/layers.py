"""Pieces our encoders share."""

from __future__ import annotations

import torch
from torch import nn


def conv_with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of the first convolution `conv` reading `in_channels` image channels instead of 3."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None)
    with torch.no_grad():  # keep what the RGB weights know: repeat their mean over the new channels
        new.weight.copy_(conv.weight.mean(1, keepdim=True).repeat(1, in_channels, 1, 1) * 3 / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new
