"""Prepare a float model for deployment: eval mode and export-friendly attention.

BatchNorm is folded into the preceding convolutions by PT2E (int8) and by every converter (float), so the
float and int8 graphs see the same folded weights.
"""
from __future__ import annotations

from torch import nn


def prepare(model: nn.Module) -> nn.Module:
    """Return `model` ready for torch.export: eval mode, no fused SDPA in timm's attention."""
    import timm.layers

    # timm's MultiQueryAttention2d calls F.scaled_dot_product_attention when fused attention is on;
    # several converters mishandle SDPA with a single shared K/V head, so use the explicit matmul form.
    timm.layers.set_fused_attn(False)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model.eval()
