"""AdaRound (Nagel et al. 2020): choose each int8 weight's rounding, up or down, to reproduce the layer output.

Round-to-nearest minimises each weight's own error, not the layer's output error. Layer by layer, front to
back, on calibration images: w_int = clamp(floor(w / s) + h(V), -127, 127) with h a rectified sigmoid of a
learned V per weight, trained to match the float model's output of that layer from the fake-quantized
model's input to it (so it also absorbs the error of the quantized layers before it), with a regulariser
that drives every h to 0 or 1 (annealed). The scale s stays the calibrated one.

The chosen weights are written into the calibrated graph as s * w_int, exactly on the int8 grid, so
convert_pt2e's round(w / s) gives back w_int: the exported int8 weights are the optimised ones. A layer whose
hard-rounded result is worse than rounding to nearest on the calibration images keeps round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import fx

from ...config.options import MAX_BATCH, MAX_IMAGES, option
from ...load.images import model_input
from ..quantizer_sites import SiteToggler
from .lockstep import Layer, LockstepContext, get_attr, lockstep, set_attr


@dataclass(frozen=True)
class AdaRound:
    """The recipe's `quantization.adaround`: learn each weight's rounding (up or down) against the float layer
    output (`adaround` below)."""

    enabled: bool = False
    iterations: int = option(50, low=1, high=100_000)  # optimisation steps per layer
    images: int = option(128, low=1, high=MAX_IMAGES)  # calibration images used
    batch_size: int = option(32, low=1, high=MAX_BATCH)


ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (from the paper)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V such that h(V) equals the fractional part: the soft weights start at the float weights."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _per_channel(switch: torch.nn.Module, w: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    scale = switch.scale.view(-1, *([1] * (w.dim() - 1))) if switch.per_channel else switch.scale.view(())
    return scale, switch.qmin, switch.qmax


def adaround(prepared: fx.GraphModule, x: np.ndarray, iterations: int = 150, batch_size: int = 32,
             lr: float = 0.01, reg: float = 0.01, seed: int = 0,
             reference: Optional[fx.GraphModule] = None) -> dict[str, Any]:
    """Optimise the rounding of every quantized conv/linear weight of `prepared`, in place."""
    toggler = SiteToggler(prepared)
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, Any] = {"layers": 0, "kept_nearest": 0, "flipped": 0, "weights": 0, "images": len(x),
                             "iterations": iterations}

    def hook(layer: Layer, out_f: torch.Tensor, out_q: torch.Tensor, args_q: tuple, ctx: LockstepContext):
        if layer.weight_quantizer is None or iterations <= 0:
            return None
        switch = ctx.switch(layer.weight_quantizer)
        if getattr(switch, "qmin", None) is None:
            return None
        w = get_attr(ctx.toggler.model, layer.weight_attr).detach().clone()
        scale, qmin, qmax = _per_channel(switch, w)
        w_floor = torch.floor(w / scale)
        v = _init_v(w / scale - w_floor).requires_grad_(True)
        bias = get_attr(ctx.toggler.model, layer.bias_attr).detach() if layer.bias_attr else None
        inp = args_q[0]
        rest = list(args_q[3:])
        fn = layer.node.target

        def output(weight: torch.Tensor, idx: Any = slice(None)) -> torch.Tensor:
            return fn(inp[idx], weight, bias, *rest)

        def soft_weight() -> torch.Tensor:
            return torch.clamp(w_floor + _h(v), qmin, qmax) * scale

        nearest = torch.clamp(torch.round(w / scale), qmin, qmax)
        opt = torch.optim.Adam([v], lr=lr)
        n = len(inp)
        warmup = int(0.2 * iterations)
        denom = float(out_f.pow(2).mean()) + 1e-12
        with torch.enable_grad():
            for it in range(iterations):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
                rec = (output(soft_weight(), idx) - out_f[idx]).pow(2).mean() / denom
                loss = rec
                if it >= warmup:
                    beta = 20 + (2 - 20) * (it - warmup) / max(1, iterations - warmup)
                    loss = rec + reg * (1 - (2 * _h(v) - 1).abs().pow(beta)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            hard = torch.clamp(w_floor + (v >= 0).to(w.dtype), qmin, qmax)
            err_hard = float((output(hard * scale) - out_f).pow(2).mean())
            err_near = float((output(nearest * scale) - out_f).pow(2).mean())
            chosen = hard if err_hard < err_near else nearest
            stats["layers"] += 1
            stats["kept_nearest"] += int(err_hard >= err_near)
            stats["flipped"] += int((chosen != nearest).sum())
            stats["weights"] += chosen.numel()
            new_w = chosen * scale
            set_attr(ctx.toggler.model, layer.weight_attr, new_w)
            set_attr(prepared, layer.weight_attr, new_w)
            return ctx.run_layer(layer, args_q)

    lockstep(toggler, model_input(x), hook, SiteToggler(reference) if reference is not None else None)
    return stats


def int8_weights(prepared: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The integer weights the calibrated graph will export: round(w / s), clamped (for checks and tests)."""
    toggler = SiteToggler(prepared)
    out = {}
    from .lockstep import layers

    for layer in layers(toggler.model):
        if layer.weight_quantizer is None:
            continue
        switch = toggler.switches.get(layer.weight_quantizer)
        if switch is None:
            continue
        w = get_attr(toggler.model, layer.weight_attr)
        scale, qmin, qmax = _per_channel(switch, w)
        out[layer.weight_attr] = torch.clamp(torch.round(w / scale), qmin, qmax).to(torch.int8)
    return out
