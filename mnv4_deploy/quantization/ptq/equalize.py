"""Channel equalization of the float model, before export: BN folding, CLE, activation equalization.

For two convs with only a per-channel affine op and ReLU between them (ReLU is positive-homogeneous:
relu(x / s) = relu(x) / s for s > 0), dividing output channel i of the first conv (weights and bias) by s_i
and multiplying input channel i of the second conv by s_i leaves the float model's output unchanged. The
choice of s decides what int8 sees:

- `cle` (cross-layer equalization, Nagel et al. 2019) balances the two convs' per-channel weight ranges,
  s_i = sqrt(r1_i / r2_i). It is designed for per-tensor weights; with per-channel weights it mostly
  reshapes the activation in between as a side effect.
- `activation` balances the per-channel ranges of the activation in between (SmoothQuant-style):
  s_i = a_i^alpha / r2_i^(1 - alpha), a_i the channel's calibration range. Per-tensor int8 activations spend
  their 256 levels on the widest channel; equalized channels all use the whole grid. When the second conv is
  depthwise (pw_exp -> dw_mid in MNv4's UIR blocks) its per-channel int8 weights absorb any s for free, so
  alpha is 1 there; for a dense second conv alpha trades activation against weight range.

BatchNorm is folded into the convs first (timm's BatchNormAct2d keeps only its activation), so the scaled
weights are the ones the quantizer sees. Only chains inside one block (or between plain ConvBnAct blocks,
and the last conv -> pool -> head -> classifier) are used: a residual connection's tensor cannot be rescaled.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ...config.options import choice, option
from ...load.images import model_input


@dataclass(frozen=True)
class Equalization:
    """The recipe's `quantization.equalization`: rescale channels between consecutive convs of the float model
    before quantization (`equalize` below)."""

    # cle: balance the weight ranges of each conv pair (Nagel et al. 2019); activation: balance the per-channel
    # ranges of the activation between them (SmoothQuant-style), which is what per-tensor int8 activations need.
    method: str = choice("none", "none", "cle", "activation")
    alpha: float = option(0.5, unit_interval=True)  # activation: share of the activation range moved into a dense next conv (depthwise: all)
    iterations: int = option(2, low=1, high=100)  # cle: passes over the chain


_HOMOGENEOUS = (nn.ReLU, nn.Identity)  # not ReLU6/hardswish: relu6(x / s) != relu6(x) / s


@dataclass
class Pair:
    """conv1 -> (folded BN) -> act -> [pool] -> conv2: output channels of conv1 feed input channels of conv2."""

    first: nn.Module  # nn.Conv2d
    act: nn.Module  # the module whose output is the activation between them (forward-hooked for its ranges)
    second: nn.Module  # nn.Conv2d or nn.Linear
    name: str = ""

    @property
    def depthwise(self) -> bool:
        c = self.second
        return isinstance(c, nn.Conv2d) and c.groups > 1 and c.groups == c.in_channels == c.out_channels


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (conv, BatchNorm) pair of timm's MNv4 blocks into the conv; the BN keeps only its activation."""
    for parent in model.modules():
        for conv_name, bn_name in (("conv", "bn"), ("conv", "bn1"), ("conv_stem", "bn1"), ("conv_exp", "bn1"),
                                   ("conv_pwl", "bn2"), ("conv_head", "norm_head")):
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold(conv, bn)
                setattr(parent, bn_name, _ActOnly(bn))
    return model


class _ActOnly(nn.Module):
    """What is left of a timm BatchNormAct2d once its affine part is folded into the conv."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    k = gamma / std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    conv.weight.mul_(k.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(beta + (bias - bn.running_mean) * k)


def find_pairs(model: nn.Module) -> list[Pair]:
    """Conv pairs of a (BN-folded) timm MNv4 model across which channels may be rescaled."""
    pairs: list[Pair] = []
    units: list[tuple[str, nn.Module, nn.Module]] = []  # a chain of (name, conv, act) without residuals

    def flush() -> None:
        for (n1, c1, a1), (_, c2, _) in zip(units, units[1:]):
            if _homogeneous(a1):
                pairs.append(Pair(c1, a1, c2, n1))
        units.clear()

    stem = getattr(model, "conv_stem", None)
    if isinstance(stem, nn.Conv2d) and isinstance(getattr(model, "bn1", None), _ActOnly):
        units.append(("conv_stem", stem, model.bn1))
    for si, stage in enumerate(getattr(model, "blocks", [])):
        for bi, block in enumerate(stage):
            name = f"blocks.{si}.{bi}"
            kind = type(block).__name__
            skip = bool(getattr(block, "has_skip", False))
            if kind == "ConvBnAct" and not skip:
                units.append((name, block.conv, block.bn1))
                continue
            flush()
            if kind == "UniversalInvertedResidual" and isinstance(getattr(block, "se", None), nn.Identity):
                for part in ("dw_start", "pw_exp", "dw_mid", "pw_proj"):
                    m = getattr(block, part)
                    if hasattr(m, "conv") and isinstance(getattr(m, "bn", None), _ActOnly):
                        units.append((f"{name}.{part}", m.conv, m.bn))
            elif kind == "EdgeResidual" and isinstance(getattr(block, "se", None), nn.Identity):
                units.append((f"{name}.conv_exp", block.conv_exp, block.bn1))
                units.append((f"{name}.conv_pwl", block.conv_pwl, block.bn2))
            elif kind == "ConvBnAct":
                units.append((name, block.conv, block.bn1))
            flush()
    # last stage conv -> global average pool (per channel, linear) -> conv_head -> classifier
    head, norm_head, classifier = (getattr(model, n, None) for n in ("conv_head", "norm_head", "classifier"))
    pool = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
    if isinstance(head, nn.Conv2d) and isinstance(norm_head, _ActOnly) and pool == "avg":
        units.append(("conv_head", head, norm_head))
        if isinstance(classifier, nn.Linear):
            units.append(("classifier", classifier, nn.Identity()))
    flush()
    return [p for p in pairs if _channels_match(p)]


def _homogeneous(act: nn.Module) -> bool:
    inner = getattr(act, "act", act)
    drop = getattr(act, "drop", nn.Identity())
    return isinstance(inner, _HOMOGENEOUS) and isinstance(drop, (nn.Identity, nn.Dropout))


def _channels_match(p: Pair) -> bool:
    out1 = p.first.out_channels
    in2 = p.second.in_features if isinstance(p.second, nn.Linear) else p.second.in_channels
    return out1 == in2 and (p.first.bias is not None)


def _first_range(p: Pair) -> torch.Tensor:
    return p.first.weight.detach().abs().flatten(1).amax(1)


def _second_range(p: Pair) -> torch.Tensor:
    w = p.second.weight.detach().abs()
    if p.depthwise:
        return w.flatten(1).amax(1)
    return w.transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def _rescale(p: Pair, s: torch.Tensor) -> None:
    """Divide the activation's channel i by s_i (conv1 row i), multiply conv2's input channel i by s_i."""
    p.first.weight.div_(s.view(-1, *([1] * (p.first.weight.dim() - 1))))
    p.first.bias.div_(s)
    w = p.second.weight
    if p.depthwise:
        w.mul_(s.view(-1, 1, 1, 1))
    else:
        w.mul_(s.view(1, -1, *([1] * (w.dim() - 2))))


def cross_layer_equalize(model: nn.Module, iterations: int = 2) -> list[Pair]:
    """CLE on a BN-folded model, in place: equal per-channel weight ranges on both sides of each pair."""
    pairs = find_pairs(model)
    for _ in range(iterations):
        for p in pairs:
            r1, r2 = _first_range(p), _second_range(p)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
            _rescale(p, s)
    return pairs


def activation_ranges(model: nn.Module, pairs: list[Pair], x: np.ndarray, batch_size: int = 64) -> list[torch.Tensor]:
    """Per-channel max |activation| between each pair's convs, averaged over calibration batches."""
    sums: list[Optional[torch.Tensor]] = [None] * len(pairs)
    handles = []
    for i, p in enumerate(pairs):
        def hook(_m, _inp, out, i=i):
            out = out.detach()
            # max |x| per channel (dim 1), as two reductions: no |x| or transposed copy of a 224x224 batch
            dims = [d for d in range(out.dim()) if d != 1]
            r = torch.maximum(out.amax(dim=dims), -out.amin(dim=dims))
            sums[i] = r if sums[i] is None else sums[i] + r
        handles.append(p.act.register_forward_hook(hook))
    n = 0
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(model_input(x[i:i + batch_size]))
                n += 1
    finally:
        for h in handles:
            h.remove()
    return [s / max(n, 1) for s in sums]


def activation_equalize(model: nn.Module, x: np.ndarray, alpha: float = 0.5) -> list[Pair]:
    """Equalize the per-channel ranges of each pair's activation (in place), SmoothQuant-style.

    Pairs are rescaled one at a time, front to back, re-measuring ranges each time: rescaling a pair changes
    the activation ranges of nothing but its own intermediate tensor, so one pass over the chain suffices.
    """
    pairs = find_pairs(model)
    ranges = activation_ranges(model, pairs, x)
    for p, a in zip(pairs, ranges):
        top = float(a.max())
        if top <= 0:
            continue
        a = a.clamp_min(top * 1e-3)  # dead channels: do not blow their weights up
        if p.depthwise:
            s = a
        else:
            r2 = _second_range(p).clamp_min(float(_second_range(p).max()) * 1e-3)
            s = a.pow(alpha) / r2.pow(1.0 - alpha)
        s = s / torch.exp(torch.log(s).mean())  # keep magnitudes: geometric mean 1
        _rescale(p, s)
    return pairs


def equalize(model: nn.Module, method: str, x: np.ndarray, alpha: float = 0.5, iterations: int = 2) -> tuple[nn.Module, dict]:
    """A BN-folded, equalized copy of `model` (the original is untouched) and what was done."""
    out = fold_batchnorm(copy.deepcopy(model))
    if method == "cle":
        pairs = cross_layer_equalize(out, iterations)
    elif method == "activation":
        pairs = activation_equalize(out, x, alpha)
    else:
        raise ValueError(f"unknown equalization method {method!r}")
    return out, {"method": method, "pairs": len(pairs), "alpha": alpha if method == "activation" else None}
