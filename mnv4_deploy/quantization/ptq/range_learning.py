"""PTQ range learning: tune every activation quantizer's scale on calibration images against float logits.

Observers pick each activation's range from that tensor alone (a percentile, an MSE or KL optimum), but what
matters is the error at the output: some tensors should clip harder, others keep their outliers. Here the
calibrated graph's activation quantizers become fake-quantizers with a learnable log-scale (zero point and
all weights fixed; LSQ-style straight-through rounding), trained with Adam for a few hundred small steps to
minimise the KL divergence between the float model's and the quantized model's class probabilities on the
calibration images (distillation; no labels, no val data). About 60 scalars are learned, so a few hundred
images do not overfit. The learned scales are written back into the observers (min/max chosen so that
calculate_qparams returns exactly the learned scale and the original zero point), so convert_pt2e and every
exporter use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...config.options import MAX_BATCH, option
from ..quantizer_sites import SiteToggler, find_sites


@dataclass(frozen=True)
class RangeLearning:
    """The recipe's `quantization.range_learning`: tune activation scales on calibration images against the
    float logits (`learn_ranges` below)."""

    steps: int = option(0, low=0, high=100_000)  # 0 = off
    lr: float = option(0.01, above=0, high=1)  # Adam, on the log of each scale
    batch_size: int = option(32, low=1, high=MAX_BATCH)


class _LearnedScaleFakeQuant(nn.Module):
    def __init__(self, switch: nn.Module) -> None:
        super().__init__()
        self.register_buffer("scale0", switch.scale.detach().clone().reshape(()))
        self.register_buffer("zero_point", switch.zero_point.detach().float().reshape(()))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.qmin, self.qmax = switch.qmin, switch.qmax

    def scale(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.log_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale()
        v = x / s + self.zero_point
        v = v + (torch.round(v) - v).detach()  # straight-through rounding
        v = torch.clamp(v, self.qmin, self.qmax)  # clipped values pass no gradient to x, but do to s
        return (v - self.zero_point) * s


def learn_ranges(prepared: fx.GraphModule, x: np.ndarray, float_logits: np.ndarray, steps: int = 200,
                 lr: float = 0.01, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Learn the activation scales of `prepared` (in place, through its observers)."""
    toggler = SiteToggler(prepared)
    model = toggler.model
    acts = [s.name for s in find_sites(prepared) if s.kind == "activation"]
    learned: dict[str, _LearnedScaleFakeQuant] = {}
    for name in acts:
        sw = toggler.switches[name]
        if sw.per_channel:
            continue
        learned[name] = _LearnedScaleFakeQuant(sw)
        setattr(model, name, learned[name])
    model.recompile() if hasattr(model, "recompile") else None
    for p in model.parameters():
        p.requires_grad_(False)
    params = [m.log_scale for m in learned.values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xs, target = torch.from_numpy(x), torch.from_numpy(float_logits)
    first = last = None
    for step in range(steps):
        idx = torch.randint(0, len(xs), (min(batch_size, len(xs)),), generator=gen)
        out = model(xs[idx])
        loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(target[idx], 1), log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
        last = float(loss)
    observers = dict(prepared.named_modules())
    changes = []
    with torch.no_grad():
        for name, m in learned.items():
            set_observer_qparams(observers[name], float(m.scale()), int(m.zero_point))
            changes.append(float(m.log_scale.exp()))
    return {"steps": steps, "images": len(x), "activations": len(learned), "loss_first": round(first or 0, 5),
            "loss_last": round(last or 0, 5),
            "scale_ratio_range": [round(min(changes), 3), round(max(changes), 3)] if changes else None}


def set_observer_qparams(observer: nn.Module, scale: float, zero_point: int) -> None:
    """Set a per-tensor affine observer's min/max so that calculate_qparams gives exactly (scale, zero_point)."""
    qmin, qmax = int(observer.quant_min), int(observer.quant_max)
    observer.min_val.resize_(()).fill_((qmin - zero_point) * scale)
    observer.max_val.resize_(()).fill_((qmax - zero_point) * scale)
    if hasattr(observer, "fitted"):
        observer.fitted = True
