"""The QAT student, built from the PTQ model itself: QAT starts exactly where `ptq-int8` ends.

`quantize()` (equalization, calibration, AdaRound / range learning / bias correction, fallback) gives a
calibrated PT2E graph. Here every observer of that graph is swapped for a fake-quantizer with the observer's
own qparams, so at step 0 the student computes the PTQ simulation's function (`QuantizedModel.simulate`):
- weights: `WeightFakeQuantize`, whose scale is recomputed from the current weights at every forward (the
  min-max scale PTQ's weight observer picks), so the grid follows the weights as they train;
- activations, and the constants quantized like activations (the hybrids' layer-scale factors): a
  `LearnableFakeQuantize` (LSQ) initialised to the observer's scale and zero point, or a plain `FakeQuantize`
  (fixed ranges; the observer inside may keep refining them while `observers` are on);
- fixed-qparams sites (softmax's TFLite 1/256 grid) stay fixed.
BatchNorm is already folded into the convs (equalization or PT2E's folding), and every conv/linear weight and
bias becomes a trainable parameter, the bias-corrected biases included. convert_pt2e accepts the graph like any
QAT graph, so every target exports the trained model through the same `QuantizedModel`.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantize
from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize
from torchao.quantization.pt2e.observer import FixedQParamsObserver, MinMaxObserver, PerChannelMinMaxObserver

from .quantizer_sites import find_sites


class WeightFakeQuantize(FakeQuantize):
    """Fake-quantizes a weight on the grid its current values give, at every forward (also in evaluation): the
    scale is a function of the weight, never a stale statistic, and convert_pt2e reads the same one."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        obs = self.activation_post_process
        obs.reset_min_max_vals()
        obs(X.detach())
        scale, zero_point = obs.calculate_qparams()
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(X, self.scale, self.zero_point, self.ch_axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)


def _fixed_qparams(observer: nn.Module) -> bool:
    return isinstance(observer, FixedQParamsObserver)


def _wrap(observer: nn.Module, cls: type, **kwargs: Any) -> nn.Module:
    """A fake-quantizer around the calibrated observer itself (its state, dtype and range are the PTQ ones)."""
    fq = cls(observer=lambda **_: observer, **kwargs)
    scale, zero_point = observer.calculate_qparams()
    if hasattr(fq, "_initialize_or_update_qparams"):  # LearnableFakeQuantize: scale/zero point are parameters
        fq._initialize_or_update_qparams(scale.float().reshape(-1).clone(), zero_point.reshape(-1).clone())
    else:
        fq.scale.resize_(scale.reshape(-1).shape).copy_(scale.reshape(-1))
        fq.zero_point.resize_(zero_point.reshape(-1).shape).copy_(zero_point.reshape(-1))
    fq.disable_observer()
    return fq


def student_from_ptq(prepared: fx.GraphModule, range_learning: bool) -> fx.GraphModule:
    """A trainable copy of a calibrated PT2E graph that computes the same function as its PTQ simulation."""
    gm = copy.deepcopy(prepared)
    swapped: dict[int, nn.Module] = {}  # observer identity -> its fake-quantizer
    for site in find_sites(gm):
        observer = getattr(gm, site.name)
        if site.kind == "weight" and type(observer) in (MinMaxObserver, PerChannelMinMaxObserver):
            fq = _wrap(observer, WeightFakeQuantize)
        elif range_learning and not _fixed_qparams(observer) and observer.qscheme == torch.per_tensor_affine:
            fq = _wrap(observer, LearnableFakeQuantize, quant_min=int(observer.quant_min),
                       quant_max=int(observer.quant_max), use_grad_scaling=True)
        else:
            fq = _wrap(observer, FakeQuantize)
        swapped[id(observer)] = fq
    # A shared quantization spec (pooling, reshapes) calls one observer object under several attribute names;
    # find_sites lists it once. Every name gets the one fake-quantizer, as convert_pt2e gives them one qparams.
    for node in gm.graph.nodes:
        if node.op == "call_module" and id(getattr(gm, node.target, None)) in swapped:
            setattr(gm, node.target, swapped[id(getattr(gm, node.target))])
    _make_layers_trainable(gm)
    gm.recompile()
    return gm


def _make_layers_trainable(gm: fx.GraphModule) -> None:
    """Every conv/linear weight and bias a parameter that trains (bias correction's biases, and the
    depthwise convs that stand for a standalone BatchNorm, are buffers or frozen tensors otherwise)."""
    from .ptq.lockstep import layers

    for layer in layers(gm):
        for target in (layer.weight_attr, layer.bias_attr):
            if target is None:
                continue
            owner_path, _, name = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            value = getattr(owner, name)
            if isinstance(value, nn.Parameter):
                value.requires_grad_(True)
                continue
            if name in owner._buffers:
                del owner._buffers[name]
            elif hasattr(owner, name):
                delattr(owner, name)
            owner.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=True))
