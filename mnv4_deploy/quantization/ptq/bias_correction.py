"""Empirical bias correction (Nagel et al. 2019, 'data-free' variant made empirical with calibration images).

Quantizing weights and input activations shifts the mean of a conv's output per channel (rounding errors do
not average out: they are correlated with the weights). The next ReLU turns a mean shift into a systematic
error. After calibration, each conv/linear's per-output-channel mean error between the fake-quantized and the
float model (on calibration images, a trimmed mean: see `robust_shift`) is subtracted from its bias, front to back, each layer seeing the
already-corrected layers before it. Biases stay float in the int8 graph (int32 at runtime), so the
correction survives convert_pt2e and every exporter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import fx

from ...config.options import MAX_IMAGES, option
from ...load.images import model_input
from ..quantizer_sites import SiteToggler
from .lockstep import Layer, LockstepContext, get_attr, lockstep, set_attr


@dataclass(frozen=True)
class BiasCorrection:
    """The recipe's `quantization.bias_correction`: remove each conv's per-channel mean output error from its
    bias (`bias_correct` below)."""

    enabled: bool = False
    images: int = option(512, low=1, high=MAX_IMAGES)  # calibration images used at most (a trimmed mean over them)
    # ...and no more than this many pixels of them (512 images at 64x64), at least 128 images: a mean shift
    # per channel over 128 images of 256x256 has more samples than 512 of 64x64, and bias correction runs
    # the float and fake-quantized model over every image, the largest share of a native-resolution convert.
    pixels: int = option(512 * 64 * 64, low=1, high=2 ** 40)

    def images_for(self, height: int, width: int) -> int:
        """How many calibration images bias correction uses at this input size."""
        return min(self.images, max(128, self.pixels // (height * width)))


def robust_shift(out_q: torch.Tensor, out_f: torch.Tensor, trim: float = 0.1) -> torch.Tensor:
    """Per-channel mean of (quantized - float) over images, the `trim` share at each end left out.

    A few calibration images drive MNv4's activations far past the calibrated ranges (on the reference
    checkpoint 6 of 512 have a logit error over 50%, the median image 0.3%); a plain mean lets them set the
    correction for every image and wrecks the model (measured: 25% top-1 agreement with 256 images).
    """
    diff = out_q - out_f
    per_image = diff.flatten(2).mean(2) if diff.dim() > 2 else diff  # (images, channels)
    k = int(len(per_image) * trim)
    ordered = per_image.sort(0).values
    return ordered[k:len(per_image) - k].mean(0) if len(per_image) - 2 * k > 0 else ordered.mean(0)


def bias_correct(prepared: fx.GraphModule, x: np.ndarray, reference: Optional[fx.GraphModule] = None) -> dict[str, Any]:
    """Correct the biases of `prepared` in place; return the mean |shift| removed per layer.

    `reference`: the calibrated graph before any algorithm edited it (the float outputs come from it); by
    default `prepared` itself, with its quantizers off.
    """
    toggler = SiteToggler(prepared)
    corrected: dict[str, float] = {}

    def hook(layer: Layer, out_f: torch.Tensor, out_q: torch.Tensor, args_q: tuple, ctx: LockstepContext):
        if layer.bias_attr is None:
            return None
        shift = robust_shift(out_q, out_f)
        bias = get_attr(ctx.toggler.model, layer.bias_attr)
        new_bias = bias - shift
        set_attr(ctx.toggler.model, layer.bias_attr, new_bias)
        set_attr(prepared, layer.bias_attr, new_bias)
        corrected[layer.name] = round(float(shift.abs().mean()), 6)
        view = (1, -1) + (1,) * (out_q.dim() - 2)
        return out_q - shift.view(view)

    lockstep(toggler, model_input(x), hook, SiteToggler(reference) if reference is not None else None)
    return {"layers": len(corrected), "images": len(x),
            "mean_abs_shift": round(float(np.mean(list(corrected.values()))), 6) if corrected else 0.0}
