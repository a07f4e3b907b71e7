"""One input adapter for every target whose artifact takes NHWC and/or raw 0..255 RGB instead of normalised NCHW.

Normalisation (x/255 - mean)/std is split as: add -255*mean (an int8-friendly add of a constant, before the
stem's zero padding, so borders stay exact), then 1/(255*std) per input channel. On a timm MNv4 model that
factor is folded into the stem convolution's weights (on a copy; the caller's model is untouched), so the
converter sees no extra op; on any other module (a quantized graph) it stays an explicit multiply.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class DeployInput(nn.Module):
    def __init__(self, model: nn.Module, pre: Any, nhwc: bool, raw_pixels: bool) -> None:
        super().__init__()
        self.nhwc, self.raw_pixels = nhwc, raw_pixels
        self.register_buffer("scale", None)  # set where the stem cannot take the 1/(255*std) factor
        if raw_pixels:
            channel_shape = (1, 1, 1, 3) if nhwc else (1, 3, 1, 1)
            self.register_buffer("shift", (-255.0 * torch.tensor(pre.mean)).view(channel_shape))
            factor = 1.0 / (255.0 * torch.tensor(pre.std))
            stem = getattr(model, "conv_stem", None)
            if isinstance(stem, nn.Conv2d) and stem.in_channels == 3:
                model = copy.deepcopy(model)
                with torch.no_grad():
                    model.conv_stem.weight.mul_(factor.to(stem.weight.dtype).view(1, 3, 1, 1))
            else:
                self.register_buffer("scale", factor.view(1, 3, 1, 1))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw_pixels:
            x = x + self.shift
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        if self.scale is not None:
            x = x * self.scale
        return self.model(x)
