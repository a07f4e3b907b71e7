"""Core ML operation semantics, one function per MIL op type (the registry `OPS`).

Each function takes the op's resolved arguments (torch tensors; strings for string constants) and returns its
output(s) computed in float32 (float64 where noted); the executor then stores each output in the dtype the
program declares for it, so every fp16-typed tensor is rounded to float16 exactly where the program says (the
rounding is modelled, not hidden). Semantics follow the MIL op definitions in coremltools
(`converters/mil/mil/ops/defs`): NCHW layouts, custom/same/valid padding, round-half-to-even quantization with
saturation, per-axis constexpr weight decompression. An op type missing here is refused by the executor.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

Args = dict[str, Any]
OpFn = Callable[[Args], Any]
OPS: dict[str, OpFn] = {}

# MIL dtype strings (cast / quantize output_dtype) -> torch dtypes
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8, "uint8": torch.uint8,
          "int16": torch.int16, "int32": torch.int32, "bool": torch.bool}
_INT_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def op(name: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        OPS[name] = fn
        return fn
    return register


def f32(t: torch.Tensor) -> torch.Tensor:
    """Compute precision: float32 (an fp16 input is exact in float32; the output is rounded back by the executor)."""
    return t.to(torch.float32) if t.dtype != torch.float64 else t


def ints(t: Any) -> list[int]:
    return [int(v) for v in torch.as_tensor(t).reshape(-1).tolist()]


def flag(t: Any, default: bool = False) -> bool:
    return default if t is None else bool(torch.as_tensor(t).item())


def _axis_view(param: torch.Tensor, rank: int, axis: Optional[int]) -> torch.Tensor:
    """A scalar, or a per-axis vector reshaped to broadcast along `axis` of a rank-`rank` tensor."""
    if param.dim() == 0:
        return param
    if axis is None:
        raise ValueError("a vector scale/zero point needs an axis")
    shape = [1] * rank
    shape[axis % rank] = param.numel()
    return param.reshape(shape)


# ----------------------------------------------------------------------------- quantization
def _exact_float(*floats: torch.Tensor) -> torch.dtype:
    """float32 where it gives the float64 result bit for bit, else float64 (float32 halves the executor's time
    in the W8A8 programs' quantize/dequantize ops).

    With float16 operands it does: an 8-bit integer (minus an 8-bit zero point) times a float16 scale has at
    most 20 significant bits, exact in float32; and a quotient of two float16 values that is not a half-integer
    lies at least 2^-12 (or |q| * 2^-11) from one, while float32 division errs by at most |q| * 2^-24, so
    round() and the clamp to the int8 range (|q| < 4096) see the same side of every half-integer.
    """
    return torch.float32 if all(t.dtype == torch.float16 for t in floats) else torch.float64


@op("quantize")
def _quantize(a: Args) -> torch.Tensor:
    """clip(round_half_to_even(x / scale) + zero_point) to the output dtype's range (iOS17 quantize).

    The quotient of the stored (e.g. float16) values is taken exactly (float64): how Core ML's own kernels
    round x / scale is not documented, so the executor uses the definition, not a guess at a kernel."""
    dtype = DTYPES[a["output_dtype"]]
    exact = _exact_float(a["input"], a["scale"])
    q = a["input"].to(exact, copy=True)  # a new tensor, computed on in place (a fresh buffer per step costs 8x)
    axis = int(a["axis"].item()) if a.get("axis") is not None else None
    q.div_(_axis_view(a["scale"].to(exact), q.dim(), axis)).round_()  # round_: half to even
    zero = a.get("zero_point")
    if zero is not None:
        q.add_(_axis_view(zero.to(exact), q.dim(), axis))
    lo, hi = _INT_RANGE[dtype]
    return q.clamp_(lo, hi).to(dtype)


@op("dequantize")
def _dequantize(a: Args) -> torch.Tensor:
    """scale * (q - zero_point) (iOS17 dequantize)."""
    exact = _exact_float(a["scale"])
    x = a["input"].to(exact, copy=True)  # computed on in place, as in quantize
    axis = int(a["axis"].item()) if a.get("axis") is not None else None
    zero = a.get("zero_point")
    if zero is not None:
        x.sub_(_axis_view(zero.to(exact), x.dim(), axis))
    return x.mul_(_axis_view(a["scale"].to(exact), x.dim(), axis))


@op("constexpr_affine_dequantize")
def _constexpr_affine_dequantize(a: Args) -> torch.Tensor:
    """iOS16 compressed weight: scale * (quantized_data - zero_point) along `axis` (materialized at load)."""
    q = a["quantized_data"].to(torch.float64)
    axis = int(a["axis"].item())
    zero = _axis_view(a["zero_point"].to(torch.float64), q.dim(), axis)
    return (q - zero) * _axis_view(a["scale"].to(torch.float64), q.dim(), axis)


@op("constexpr_blockwise_shift_scale")
def _constexpr_blockwise_shift_scale(a: Args) -> torch.Tensor:
    """iOS18 compressed weight: scale[block] * (data - offset[block]); block sizes = data.shape / scale.shape."""
    data = a["data"].to(torch.float64)
    scale = a["scale"].to(torch.float64)
    offset = a.get("offset")
    offset = offset.to(torch.float64) if offset is not None else torch.zeros_like(scale)
    if scale.dim() != data.dim():
        raise ValueError(f"scale rank {scale.dim()} != data rank {data.dim()}")
    for dim, (n, s) in enumerate(zip(data.shape, scale.shape)):
        if n % s:
            raise ValueError(f"dimension {dim}: {n} values do not split into {s} blocks")
        scale = scale.repeat_interleave(n // s, dim=dim)
        offset = offset.repeat_interleave(n // s, dim=dim)
    return scale * (data - offset)


# ----------------------------------------------------------------------------- elementwise
@op("cast")
def _cast(a: Args) -> torch.Tensor:
    """Float <-> float casts (round to nearest even); casts to integers are refused (rounding mode unmodelled)."""
    dtype = DTYPES.get(a["dtype"])
    if dtype not in (torch.float16, torch.float32) or not a["x"].is_floating_point():
        raise NotImplementedError(f"cast from {a['x'].dtype} to '{a['dtype']}' is not modelled")
    return a["x"].to(torch.float32)


@op("relu")
def _relu(a: Args) -> torch.Tensor:
    return _f32_copy(a["x"]).relu_()


@op("add")
def _add(a: Args) -> torch.Tensor:
    x, y = a["x"], a["y"]
    if x.shape == y.shape:  # (a broadcast add computes out of place)
        return _f32_copy(x).add_(f32(y))
    return f32(x) + f32(y)


def _f32_copy(t: torch.Tensor) -> torch.Tensor:
    """`f32(t)` as a new tensor, for an op to compute on in place (one buffer instead of one per step)."""
    return t.to(torch.float32 if t.dtype != torch.float64 else t.dtype, copy=True)


@op("mul")
def _mul(a: Args) -> torch.Tensor:
    return f32(a["x"]) * f32(a["y"])


@op("softmax")
def _softmax(a: Args) -> torch.Tensor:
    return torch.softmax(f32(a["x"]), dim=int(a["axis"].item()) if a.get("axis") is not None else -1)


# ----------------------------------------------------------------------------- linear algebra
def _same_padding(size: int, kernel: int, stride: int, dilation: int, lower: bool) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (large, small) if lower else (small, large)


@op("conv")
def _conv(a: Args) -> torch.Tensor:
    """N-d convolution, NC[D]HW, weight [C_out, C_in / groups, *K]; pad_type custom | valid | same | same_lower."""
    x, w = f32(a["x"]), f32(a["weight"])
    spatial = x.dim() - 2
    strides = ints(a["strides"]) if a.get("strides") is not None else [1] * spatial
    dilations = ints(a["dilations"]) if a.get("dilations") is not None else [1] * spatial
    groups = int(a["groups"].item()) if a.get("groups") is not None else 1
    pad_type = a.get("pad_type", "valid")
    if pad_type == "custom":
        pad = ints(a["pad"])  # [begin_0, end_0, begin_1, end_1, ...] over the spatial dims
        pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(spatial)]
    elif pad_type == "valid":
        pairs = [(0, 0)] * spatial
    elif pad_type in ("same", "same_lower"):
        pairs = [_same_padding(x.shape[2 + i], w.shape[2 + i], strides[i], dilations[i], pad_type == "same_lower")
                 for i in range(spatial)]
    else:
        raise NotImplementedError(f"conv pad_type '{pad_type}' is not modelled")
    flat = [p for pair in reversed(pairs) for p in pair]  # F.pad: last dimension first
    if any(flat):
        x = F.pad(x, flat)
    bias = f32(a["bias"]) if a.get("bias") is not None else None
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, w, bias, strides, 0, dilations, groups)


@op("linear")
def _linear(a: Args) -> torch.Tensor:
    bias = f32(a["bias"]) if a.get("bias") is not None else None
    return F.linear(f32(a["x"]), f32(a["weight"]), bias)


@op("matmul")
def _matmul(a: Args) -> torch.Tensor:
    x, y = f32(a["x"]), f32(a["y"])
    if flag(a.get("transpose_x")):
        x = x.transpose(-1, -2)
    if flag(a.get("transpose_y")):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@op("batch_norm")
def _batch_norm(a: Args) -> torch.Tensor:
    """Inference batch norm over axis 1: gamma * (x - mean) / sqrt(variance + epsilon) + beta."""
    x = f32(a["x"])
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = float(a["epsilon"].item()) if a.get("epsilon") is not None else 1e-5
    y = (x - f32(a["mean"]).reshape(shape)) / torch.sqrt(f32(a["variance"]).reshape(shape) + eps)
    if a.get("gamma") is not None:
        y = y * f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + f32(a["beta"]).reshape(shape)
    return y


# ----------------------------------------------------------------------------- reductions and layout
@op("reduce_mean")
def _reduce_mean(a: Args) -> torch.Tensor:
    x = f32(a["x"])
    axes = ints(a["axes"]) if a.get("axes") is not None else list(range(x.dim()))
    return x.mean(dim=axes, keepdim=flag(a.get("keep_dims")))


@op("reshape")
def _reshape(a: Args) -> torch.Tensor:
    """Layout only (integer tensors stay integer). 0 copies the input's dimension when ranks match; -1 infers."""
    x, shape = a["x"], ints(a["shape"])
    if len(shape) == x.dim():
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("transpose")
def _transpose(a: Args) -> torch.Tensor:
    return a["x"].permute(ints(a["perm"]))


def covered() -> list[str]:
    """Op types the executor runs ('const' is read, not run)."""
    return sorted(OPS)


