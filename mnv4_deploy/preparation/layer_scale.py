"""Layer scale folded into the layer before it, in the copy of the float model that gets quantized.

MNv4's hybrids end every inverted-residual and attention block with timm's `LayerScale2d` (a per-channel multiply
by `gamma`) right after a layer with no activation: the projection's BatchNorm, or the Mobile MQA's output
convolution. In an int8 graph that multiply is a float op between two quantizers (dequantize, multiply,
quantize in onnxruntime; a separate Multiply in OpenVINO) and one more rounding. Scaling that layer's output
channels by `gamma` instead computes the same function in float, and the multiply and its quantizer disappear.

Only the model handed to the quantizer is changed (a copy): the float model, its exports and its state_dict
keep timm's parameters.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _scale_output_channels(layer: nn.Module, gamma: torch.Tensor) -> bool:
    """Multiply `layer`'s output channels by `gamma` in place, if it is a layer whose output is linear in its
    parameters (BatchNorm without activation, or a convolution); False when it is not."""
    from timm.layers import BatchNormAct2d

    with torch.no_grad():
        if isinstance(layer, BatchNormAct2d) and isinstance(layer.act, nn.Identity) and layer.affine:
            layer.weight.mul_(gamma)
            layer.bias.mul_(gamma)
            return True
        if type(layer) is nn.BatchNorm2d and layer.affine:
            layer.weight.mul_(gamma)
            layer.bias.mul_(gamma)
            return True
        if type(layer) is nn.Conv2d:
            layer.weight.mul_(gamma.view(-1, 1, 1, 1))
            if layer.bias is not None:
                layer.bias.mul_(gamma)
            return True
    return False


def _layer_before_scale(block: nn.Module) -> nn.Module | None:
    """The layer whose output feeds `block.layer_scale` directly, for timm's MNv4 blocks (None: not known)."""
    from timm.models._efficientnet_blocks import MobileAttention, UniversalInvertedResidual

    from .mqa import MobileMQA

    if isinstance(block, UniversalInvertedResidual):
        last = block.pw_proj if isinstance(block.dw_end, nn.Identity) else block.dw_end
        return getattr(last, "bn", None)
    if isinstance(block, MobileAttention) and isinstance(block.attn, MobileMQA):
        return block.attn.output.proj
    return None


def fold_layer_scales(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` with every foldable `LayerScale2d` folded into the layer before it (the model itself,
    untouched, when it has none); and how many were folded."""
    from timm.layers import LayerScale2d

    if not any(isinstance(m, LayerScale2d) for m in model.modules()):
        return model, 0
    model = copy.deepcopy(model)
    folded = 0
    for name, block in model.named_modules():
        scale = getattr(block, "layer_scale", None)
        if not isinstance(scale, LayerScale2d):
            continue
        layer = _layer_before_scale(block)
        if layer is not None and _scale_output_channels(layer, scale.gamma.detach()):
            block.layer_scale = nn.Identity()
            folded += 1
        else:
            logger.debug(f"layer scale of {name} kept: no foldable layer before it")
    return model, folded
