"""An export-friendly Mobile MQA: timm's MultiQueryAttention2d rewritten for converters and accelerators.

timm's module reshapes to 3-D/5-D, copies the shared K/V head per query head (`.contiguous()`), and calls
`scaled_dot_product_attention` when fused attention is on; several converters mishandle that (coremltools'
tracing frontend fails on it, SDPA with a single K/V head trips ONNX/OpenVINO/CoreML lowerings).

`MobileMQA` computes exactly the same function from the same parameters, with only:
  - 4-D tensors (NCHW, in the spirit of Apple's ANE transformer layout),
  - 1x1 convolutions for the projections (timm's own conv modules, so the state_dict is unchanged),
  - two plain matmuls with batch dimension 1: because the single K/V head is shared by all query heads,
    the query heads are laid side by side along the last axis ([B, 1, key_dim, heads * L]) and one matmul
    against K serves all heads at once: no per-head copy, no broadcast expand, no transposes of activations
    except the small K (one head, downsampled),
  - no SDPA, no einsum, and shapes fixed by the input's spatial size.

The head layout is obtained by permuting the query and output projection weights inside `forward` (a
constant expression on the parameters that every converter folds), so training, `load_state_dict` and
quantization all keep working on timm's original parameters. The softmax scale is folded into that same
constant, which removes one activation multiply (and one quantize/dequantize pair in int8 graphs).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class MobileMQA(nn.Module):
    """Drop-in for timm's MultiQueryAttention2d; shares (never copies) the timm module's submodules."""

    def __init__(self, query: nn.Sequential, key: nn.Sequential, value: nn.Sequential, output: nn.Sequential,
                 attn_drop: nn.Module, num_heads: int, key_dim: int, value_dim: int,
                 query_strides: tuple[int, int] = (1, 1), kv_stride: int = 1) -> None:
        super().__init__()
        # Same child names as timm (query/key/value/attn_drop/output), so state_dict keys are identical.
        self.query, self.key, self.value, self.attn_drop, self.output = query, key, value, attn_drop, output
        self.num_heads, self.key_dim, self.value_dim = int(num_heads), int(key_dim), int(value_dim)
        self.query_strides = tuple(int(s) for s in query_strides)
        self.kv_stride = int(kv_stride)
        self.has_query_strides = any(s > 1 for s in self.query_strides)
        self.scale = self.key_dim ** -0.5
        for name, proj in (("query.proj", query.proj), ("output.proj", output.proj)):
            if type(proj) is not nn.Conv2d or proj.kernel_size != (1, 1) or proj.stride != (1, 1) or proj.groups != 1:
                raise ValueError(f"MobileMQA needs a plain 1x1 nn.Conv2d as {name}, got {proj!r}")

    @classmethod
    def from_timm(cls, module: nn.Module) -> "MobileMQA":
        """Build from a timm MultiQueryAttention2d, sharing its parameters (same names, shapes, values)."""
        return cls(module.query, module.key, module.value, module.output, module.attn_drop,
                   module.num_heads, module.key_dim, module.value_dim, module.query_strides, module.kv_stride)

    def _query_weight(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """query.proj weight with output channels reordered head-major -> key-major, softmax scale folded in."""
        proj = self.query.proj
        h, k = self.num_heads, self.key_dim
        w = proj.weight.reshape(h, k, -1, 1, 1).transpose(0, 1).reshape(k * h, -1, 1, 1) * self.scale
        b = None if proj.bias is None else proj.bias.reshape(h, k).transpose(0, 1).reshape(k * h) * self.scale
        return w, b

    def _output_weight(self) -> torch.Tensor:
        """output.proj weight with input channels reordered head-major -> value-major (matches `o` below)."""
        w, c = self.output.proj.weight, self.output.proj.out_channels
        h, v = self.num_heads, self.value_dim
        return w.reshape(c, h, v, 1, 1).transpose(1, 2).reshape(c, v * h, 1, 1)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, kd, vd = self.num_heads, self.key_dim, self.value_dim
        # Query: optional stride (avg-pool + norm), then the projection with key-major output channels:
        # [B, k*h, Hq, Wq] is, in memory, [B, 1, k, h*Hq*Wq] -- every head side by side along the last axis.
        q = x
        if self.has_query_strides:
            q = self.query.norm(self.query.down_pool(q))
        qw, qb = self._query_weight()
        q = F.conv2d(q, qw, qb)
        # Static shapes: sizes are plain Python ints (constants in a jit trace too; traced size arithmetic
        # becomes int-cast ops, which is what breaks coremltools on timm's module). No arithmetic on sizes.
        b, hq, wq = _static(x.shape[0]), _static(q.shape[-2]), _static(q.shape[-1])
        q = q.reshape(b, 1, kd, -1)  # [B, 1, k, h*L]

        # The single K/V head (optionally downsampled by a strided depthwise conv + norm): [B, 1, k|v, P].
        k = self.key(x)
        k = k.reshape(b, 1, kd, -1).transpose(-1, -2)  # [B, 1, P, k] (small)
        v = self.value(x)
        v = v.reshape(b, 1, vd, -1)  # [B, 1, v, P]

        attn = k @ q  # [B, 1, P, h*L]: logits of all heads in one matmul
        if attn_mask is not None:
            # timm's mask is [..., L, P] per head; bring it to this layout (rare path, not used by MNv4).
            p = attn.shape[2]
            mask = attn_mask.expand(b, h, -1, p).permute(0, 3, 1, 2)  # [B, P, h, L]
            attn = attn + mask.reshape(b, 1, p, -1)
        attn = attn.softmax(dim=2)
        if self.training:  # dropout is the identity in eval; keep it out of exported graphs
            attn = self.attn_drop(attn)
        o = v @ attn  # [B, 1, v, h*L]
        o = o.reshape(b, vd * h, hq, wq)  # value-major channels; _output_weight matches that order

        if self.has_query_strides:
            o = self.output.upsample(o)
        proj = self.output.proj
        o = F.conv2d(o, self._output_weight(), proj.bias)
        return self.output.drop(o) if self.training else o

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"query_strides={self.query_strides}, kv_stride={self.kv_stride}")


def _static(size: Any) -> int:
    """A tensor size as a constant: under jit tracing sizes are traced values unless made ints here."""
    return int(size) if torch.jit.is_tracing() else size


def swap_attention(model: nn.Module) -> int:
    """Replace every timm MultiQueryAttention2d in `model` by a MobileMQA in place; return how many."""
    from timm.layers.attention2d import MultiQueryAttention2d

    targets = [(name, m) for name, m in model.named_modules() if type(m) is MultiQueryAttention2d]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MobileMQA.from_timm(m))
    return len(targets)
