"""The quantized activations of a W8A8 ML Program, as the tensor-by-tensor check reads them.

Every `quantize` op output (and integer tensors that layout ops move: reshape/transpose of int8 data) is an
activation quantizer. What its integers mean is not always the quantize op's own scale: coremltools' pass
`distributive_quantized_binary_op_scale_normalization` rewrites `q(dq(a, s1) + dq(b, s2), s)` as
`q(dq(a, s1/s2) + dq(b, 1), s/s2)`, so float tensors between a dequantize and the next quantize may carry a
constant factor. A static pass tracks that factor (true value = stored value x factor): a tensor's true scale
is its quantize scale times its input's factor. Ops that are linear in their input (add of equal factors, mul,
matmul, relu, layout, mean) pass factors on; every other op (conv with bias, linear, softmax, ...) needs factor
1, and a factor that reaches one is a defect: the integer tensor whose reader introduced it gets a note
(written with one scale, read with another, never undone), which the check flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ....verify.tensorwise import SCALE_RTOL, QTensor, signed_values, signed_zero_point
from .executor import Executor
from .reader import Op

# Scales are stored in the program's precision (float16 in fp16 programs): 2^-11 relative rounding each, and a
# rescaled add composes two or three of them.
FACTOR_RTOL = 2.0 ** -9
FP16_SCALE_RTOL = 2.0 ** -10  # a float16 scale vs PyTorch's float32 one: 2^-11 rounding, with margin
_SCALE_FREE = ("relu", "reshape", "transpose", "reduce_mean", "max_pool", "avg_pool", "cast", "squeeze",
               "expand_dims", "slice_by_index", "slice_by_size", "split", "concat")
_LAYOUT = ("reshape", "transpose", "squeeze", "expand_dims")
_PRODUCT = ("mul", "matmul")
_SAME = ("add", "sub", "maximum", "minimum", "concat")


@dataclass
class IntTensor:
    name: str
    scale: float  # true scale (quantize scale x its input's factor)
    zero_point: int
    dtype: np.dtype
    op: str
    order: int
    read_scales: list[tuple[str, float]] = field(default_factory=list)  # (dequantize op, scale it reads with)
    notes: list[str] = field(default_factory=list)


def _const(executor: Executor, op: Op, param: str) -> Optional[np.ndarray]:
    bindings = op.inputs.get(param)
    if not bindings:
        return None
    kind, ref = bindings[0]
    if kind == "value":
        return np.asarray(ref)
    value = executor.consts.get(ref)
    return None if value is None else np.asarray(value)


def _float_args(op: Op, executor: Executor) -> list[str]:
    return [ref for bindings in op.inputs.values() for kind, ref in bindings
            if kind == "name" and ref not in executor.consts]


def _close(a: float, b: float, rtol: float = FACTOR_RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def analyse(executor: Executor) -> list[IntTensor]:
    """The program's integer activations with their true quantization parameters and consistency notes."""
    ints: dict[str, IntTensor] = {}
    factor: dict[str, float] = {v.name: 1.0 for v in executor.program.inputs}
    origins: dict[str, set[tuple[str, str]]] = {}  # float tensor -> (int tensor, dequantize) that rescaled it

    def fact(name: str) -> float:
        return factor.get(name, 1.0)

    for op in executor.ops:
        args = _float_args(op, executor)
        out = op.outputs[0].name
        if op.type == "quantize":
            scale, zero = _const(executor, op, "scale"), _const(executor, op, "zero_point")
            if scale is None or scale.size != 1:
                continue  # per-axis quantize: not an activation quantizer
            dtype = np.dtype(str(op.outputs[0].dtype).lower())
            src = op.inputs["input"][0][1]
            ints[out] = IntTensor(out, float(scale.reshape(())) * fact(src), int(zero.reshape(())) if zero is not None
                                  else 0, dtype, op.type, len(ints))
        elif op.type in _LAYOUT and args and args[0] in ints:
            src = ints[args[0]]
            ints[out] = IntTensor(out, src.scale, src.zero_point, src.dtype, op.type, len(ints))
        elif op.type == "dequantize":
            src = ints.get(args[0]) if args else None
            scale, zero = _const(executor, op, "scale"), _const(executor, op, "zero_point")
            if src is None or scale is None or scale.size != 1:
                factor[out], origins[out] = 1.0, set()
                continue
            read, zp = float(scale.reshape(())), int(zero.reshape(())) if zero is not None else 0
            src.read_scales.append((out, read))
            if zp != src.zero_point:
                src.notes.append(f"written with zero point {src.zero_point} but read with {zp} by dequantize '{out}'")
            factor[out] = src.scale / read
            origins[out] = set() if _close(factor[out], 1.0) else {(src.name, out)}
        elif op.type in _SAME:
            factors = [fact(a) for a in args]
            factor[out] = factors[0] if factors else 1.0
            origins[out] = set().union(*(origins.get(a, set()) for a in args))
            if any(not _close(f, factors[0]) for f in factors):
                _note(ints, origins[out], op, "adds it to a tensor with another scale factor")
                factor[out], origins[out] = 1.0, set()
        elif op.type in _PRODUCT:
            factor[out] = float(np.prod([fact(a) for a in args]))
            origins[out] = set().union(*(origins.get(a, set()) for a in args))
        elif op.type in _SCALE_FREE:
            factor[out] = fact(args[0]) if args else 1.0
            origins[out] = set(origins.get(args[0], set())) if args else set()
        else:
            bad = {o for a in args if not _close(fact(a), 1.0) for o in origins.get(a, set())}
            if bad:
                _note(ints, bad, op, "uses it without undoing the rescaling")
            for o in op.outputs:
                factor[o.name], origins[o.name] = 1.0, set()
    for t in ints.values():  # report the scale a reader stores for it (the program's own number) when one agrees
        agreeing = [s for _, s in t.read_scales if _close(s, t.scale)]
        if agreeing:
            t.scale = agreeing[0]
    return list(ints.values())


def _note(ints: dict[str, IntTensor], origins: set[tuple[str, str]], op: Op, what: str) -> None:
    for name, reader in origins:
        t = ints[name]
        read = dict(t.read_scales)[reader]
        t.notes.append(f"written with scale {t.scale:.6g} but read with scale {read:.6g} by dequantize '{reader}', "
                       f"and {op.type} '{op.name}' {what}")


def quantized_tensors(executor: Executor, x: np.ndarray, input_name: str) -> tuple[list[QTensor], dict[str, Any]]:
    """Run the program on `x` and return its integer activations as QTensors (signed int8 grid), with facts."""
    found = analyse(executor)
    fp16 = any(v.dtype == "FLOAT16" for v in executor.program.types.values())
    values = executor.run({input_name: x}, outputs=[t.name for t in found])
    rtol = FP16_SCALE_RTOL if fp16 else SCALE_RTOL
    out = [QTensor(t.name, t.scale, signed_zero_point(t.zero_point, t.dtype), signed_values(values[t.name], t.dtype),
                   t.order, op=t.op, note="; ".join(t.notes), scale_rtol=rtol) for t in found]
    info = {"runtime": "reference ML Program executor (mnv4_deploy.targets.coreml.mlprogram) on the saved program: "
                       "its quantize outputs",
            "runtime_quantize_ops": sum(1 for t in found if t.op == "quantize"),
            "runtime_integer_layout_ops": sum(1 for t in found if t.op != "quantize"),
            "scale_precision": "float16 (compared with PyTorch's float32 scales to 2^-10 relative)" if fp16
            else "float32"}
    return out, info
