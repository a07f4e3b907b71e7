"""Prepare a float model for deployment: eval mode and export-friendly attention.

BatchNorm is folded into the preceding convolutions by PT2E (int8) and by every converter (float), so the
float and int8 graphs see the same folded weights.
"""
from __future__ import annotations

from torch import nn


def prepare(model: nn.Module) -> nn.Module:
    """Return `model` ready for every converter: eval mode, timm's Mobile MQA swapped for `MobileMQA`.

    `MobileMQA` (mnv4_deploy.preparation.mqa) computes the same function from the same parameters (state_dict unchanged)
    with 4-D tensors, 1x1 convs and two plain matmuls: no SDPA, no einsum, no per-head K/V copies, so
    torch.export, jit tracing and every target's converter handle the hybrids. Any other timm attention is
    switched off its fused SDPA path for the same reason. Safe to call twice.
    """
    import timm.layers

    from .mqa import swap_attention

    swap_attention(model)
    # Several converters mishandle SDPA with a single shared K/V head: use the explicit matmul form.
    timm.layers.set_fused_attn(False)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model.eval()
