"""Signed -> unsigned activations: rewrite a QDQ ONNX file's activation QuantizeLinear/DequantizeLinear zero
points from int8 (int16) to uint8 (uint16), zero point + 128 (+ 32768), same scale: exactly the same real values.

onnxruntime's CPU provider on x86 fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv only for
uint8 activations (signed activations are an ARM path); it converts int8 pairs itself only where a
QuantizeLinear has one consumer, so every MNv4 residual branch stayed a float Conv between Q/DQ. QNN's HTP
documents uint8/uint16 activations. Weights (per-channel, symmetric) keep their signed type.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np


def activations_to_uint8(path: Path) -> int:
    """int8 activation zero points as uint8 (the onnx target's default `activation_dtype`); int16 fallback sites
    stay int16. Returns how many zero points were rewritten."""
    return activations_to_unsigned(path, np.int8)


# signed activation type -> (its unsigned twin, ONNX element types, zero-point shift)
_UNSIGNED = {np.dtype(np.int8): (np.uint8, "INT8", "UINT8", 128),
             np.dtype(np.int16): (np.uint16, "INT16", "UINT16", 32768)}


def activations_to_unsigned(path: Path, signed: Any) -> int:
    """Rewrite the activation QuantizeLinear/DequantizeLinear zero points of type `signed` (int8 or int16) as
    the unsigned type (zero point + 2^(bits-1), same scale): the same real values. Weights keep their type.
    Returns how many zero points were rewritten."""
    import onnx
    from onnx import numpy_helper

    unsigned, signed_elem, unsigned_elem, shift = _UNSIGNED[np.dtype(signed)]
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name: str) -> Optional[np.ndarray]:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = constants.get(name)
        return numpy_helper.to_array(node.attribute[0].t) if node is not None and node.attribute else None

    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] not in initializers and n.input[0] not in constants}
    renamed: dict[str, str] = {}
    for node in graph.node:
        activation = (node.op_type == "QuantizeLinear" and node.output[0] in quantized) or (
            node.op_type == "DequantizeLinear" and node.input[0] in quantized)
        zero = value(node.input[2]) if activation and len(node.input) > 2 else None
        if zero is None or zero.dtype != np.dtype(signed):
            continue
        if node.input[2] not in renamed:
            name = f"{node.input[2]}_{np.dtype(unsigned).name}"
            graph.initializer.append(numpy_helper.from_array((zero.astype(np.int64) + shift).astype(unsigned), name))
            renamed[node.input[2]] = name
        node.input[2] = renamed[node.input[2]]
    used = {name for n in graph.node for name in n.input}
    for old in [t for t in graph.initializer if t.name in renamed and t.name not in used]:
        graph.initializer.remove(old)
    for info in list(graph.value_info):  # the shapes stay; the element type of the quantized tensors changes
        if info.name in quantized and info.type.tensor_type.elem_type == getattr(onnx.TensorProto, signed_elem):
            info.type.tensor_type.elem_type = getattr(onnx.TensorProto, unsigned_elem)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(renamed)
