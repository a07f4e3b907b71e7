"""Batchnorm as depthwise: an eval-mode BatchNorm that follows no convolution, rewritten as the 1x1 depthwise conv
it is, so the quantizer treats it as a conv (int8 per-channel weights, which represent one value per channel
exactly).

prepare_pt2e folds BatchNorm into a preceding conv; the hybrids' MobileAttention blocks also normalise their input
(a residual sum) with a BatchNorm of their own, which nothing annotates: it stayed float (dequantize, sub, mul,
mul, add, quantize in TFLite). The shared quantizer runs this pass in `transform_for_annotation`, after PT2E's
conv-BN folding.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def batchnorm_as_depthwise(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite each eval-mode BatchNorm that follows no convolution as the 1x1 depthwise conv it is.

    prepare_pt2e folds BatchNorm into a preceding conv; the hybrids' MobileAttention blocks also normalise
    their input (a residual sum) with a BatchNorm of their own, which nothing annotates: it stayed float
    (dequantize, sub, mul, mul, add, quantize in TFLite). As a depthwise conv (weight gamma/sqrt(var+eps) per
    channel, bias beta - mean*weight) it is quantized like every conv: int8 per-channel weights, which
    represent one value per channel exactly. Runs after PT2E's conv-BN folding (prepare_pt2e calls
    `transform_for_annotation` then); training-mode BatchNorms (QAT) are left as they are.
    """
    def value(node: Any) -> Optional[torch.Tensor]:
        if node is None:
            return None
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj.detach()

    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.batch_norm.default:
            continue
        x, weight, bias, mean, var, training, _, eps = node.args[:8]
        params = (weight, bias, mean, var)
        if training or not all(p is None or (isinstance(p, torch.fx.Node) and p.op == "get_attr") for p in params):
            continue
        if mean is None or var is None or len(node.meta["val"].shape) != 4:
            continue
        scale = torch.rsqrt(value(var) + eps)
        if weight is not None:
            scale = scale * value(weight)
        shift = -value(mean) * scale + (value(bias) if bias is not None else 0.0)
        channels = scale.numel()
        name = f"_{node.name}_as_depthwise"
        gm.register_buffer(f"{name}_weight", scale.reshape(channels, 1, 1, 1).contiguous())
        gm.register_buffer(f"{name}_bias", shift.contiguous())
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{name}_weight")
            b = gm.graph.get_attr(f"{name}_bias")
            conv = gm.graph.call_function(torch.ops.aten.conv2d.default, (x, w, b, [1, 1], [0, 0], [1, 1], channels))
        conv.meta.update({k: v for k, v in node.meta.items() if k != "source_fn_stack"})
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm
