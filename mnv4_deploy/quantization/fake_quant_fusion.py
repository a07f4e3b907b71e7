"""The simulation's quantize -> dequantize pairs as one fused step, bit for bit the same numbers.

torchao's decomposed `quantize_per_tensor` / `dequantize_per_tensor` take eight passes over each activation
(multiply, round, add, clamp, cast; cast, subtract, multiply): about 70% of the simulation's time at 224x224,
where the convolutions take 20%. `torch.fake_quantize_per_tensor_affine` computes the same float32 arithmetic
(x times the float32 reciprocal of the scale, rounded half to even, plus the zero point, clamped, minus the
zero point, times the scale) in one pass. The one place they may part is the reciprocal: the decomposed op
rounds 1/scale computed in double to float32, the fused kernel divides in float32; where those two differ
for a scale the pair is left as it is. Only the logits of the simulation use the fused graph; the tensor-by-tensor
check reads the integer outputs of the decomposed quantize ops.

For the full int8/uint8 ranges, quantizing to a quantized tensor and back (`torch.quantize_per_tensor`, FBGEMM's
vectorized kernels) computes the same arithmetic again, 2.5x faster than the fake-quantize kernel (which also
writes a mask for its gradient); it is used where no gradient is wanted and every value is finite and small
enough for FBGEMM's int32 intermediate (larger ones wrap around there), else the fake-quantize kernel.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import fx

_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default
_INTEGER_TYPES = (torch.int8, torch.uint8, torch.int16, torch.int32)
_QUANTIZED_TYPES = {(-128, 127): torch.qint8, (0, 255): torch.quint8}
_INT32_SAFE = 2.0 ** 30  # |x / scale| below this: FBGEMM's float -> int32 conversion cannot overflow


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """One fused quantize-dequantize, laid out in memory as the decomposed ops' elementwise output would be:
    the fused kernel copies the input's strides, which for a tensor with size-1 dimensions (the pooled
    (N, C, 1, 1) before the head) can be a channels-last layout of a contiguous tensor, and a convolution
    then picks another algorithm and rounds differently."""
    y = quantize_dequantize(x, scale, zero_point, quant_min, quant_max)
    for layout in (torch.contiguous_format, torch.channels_last):  # TensorIterator's order of preference
        if layout is torch.channels_last and x.dim() != 4:
            break
        if x.is_contiguous(memory_format=layout):
            return y if y.stride() == _strides(tuple(y.shape), layout) else y.clone(memory_format=layout)
    return y


def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """`torch.fake_quantize_per_tensor_affine(x, ...)`, through FBGEMM's quantize/dequantize where that gives the
    same numbers (see the module docstring): one read of `x` first to bound its values."""
    qtype = _QUANTIZED_TYPES.get((quant_min, quant_max))
    if qtype is not None and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled()):
        low, high = torch.aminmax(x)
        bound = _INT32_SAFE * scale
        if -bound < float(low) and float(high) < bound:  # False for NaN too
            _deprecation_warned()
            return torch.quantize_per_tensor(x, scale, zero_point, qtype).dequantize()
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)


@functools.cache
def _deprecation_warned() -> None:
    """torch warns once per process that quantized tensors are deprecated: that one warning is raised here,
    silenced, so no call on a hot path (or in the background simulation's thread) touches the warning filters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.qint8)


def _strides(shape: tuple[int, ...], layout: torch.memory_format) -> tuple[int, ...]:
    """The strides a new tensor of `shape` gets in `layout` (NCHW order of dimensions either way)."""
    order = [0, 2, 3, 1] if layout is torch.channels_last else list(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)


def same_reciprocal(scale: float) -> bool:
    """Whether float32(1 / scale) computed in double equals 1 / scale computed in float32."""
    s = np.float32(scale)
    return float(s) == scale and np.float32(1.0 / float(s)) == np.float32(1.0) / s


def fuse_fake_quantize(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every quantize_per_tensor whose users are all matching dequantize_per_tensor ops with one
    fake_quantize_per_tensor_affine (in place); returns `gm`."""
    changed = False
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target != _Q or len(q.args) < 6 or q.kwargs:
            continue
        x, scale, zero_point, qmin, qmax, dtype = q.args[:6]
        if not (isinstance(scale, float) and isinstance(zero_point, int) and dtype in _INTEGER_TYPES
                and same_reciprocal(scale)):
            continue
        users = list(q.users)
        if not users or any(u.op != "call_function" or u.target != _DQ or u.kwargs or
                            tuple(u.args[1:6]) != (scale, zero_point, qmin, qmax, dtype) for u in users):
            continue
        with gm.graph.inserting_before(q):
            fused = gm.graph.call_function(fake_quantize, (x, scale, zero_point, qmin, qmax))
        fused.meta.update(users[0].meta)
        for u in users:
            u.replace_all_uses_with(fused)
            gm.graph.erase_node(u)
        gm.graph.erase_node(q)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
