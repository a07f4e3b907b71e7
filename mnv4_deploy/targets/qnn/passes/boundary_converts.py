"""QNN boundary converts: an int16 fallback site between 8-bit tensors, made into what HTP runs.

QNN's mixed-precision convention: every node unit (DQ inputs -> op -> Q output) runs in one activation type,
and regions of different types meet through a DQ -> Q convert. An int16 fallback site is a 16-bit tensor between
8-bit ones, so its producer (8-bit inputs) and consumers (8-bit outputs) would mix types, which HTP refuses
("standalone DQ with per-channel quantization"). Such a unit is promoted to 16 bits: each 8-bit input passes an
exact u8 -> u16 convert (scale/256, zero point*256: every value kept), and an 8-bit output is computed in 16 bits
on the 8-bit grid/256 and then converted down (a second rounding, off from a direct 8-bit rounding only within
1/512 LSB of a midpoint).

Runs on the QDQ ONNX file after its activations are unsigned (onnx/passes/unsigned_activations.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

_PASS_THROUGH = ("Relu", "Clip")  # fused between a compute op and its output QuantizeLinear


def convert_boundaries(path: Path) -> int:
    """Insert the converts where a node unit mixes 8- and 16-bit activations (see the module); rewrite `path` in
    place when any was inserted. Returns how many converts were inserted."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = _initializers(model)
    producer = {o: n for n in graph.node for o in n.output}

    def bits(node: Any) -> Optional[int]:  # an activation Q/DQ's bit width
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[0] in inits \
                or len(node.input) < 3 or node.input[2] not in inits:
            return None
        return 8 * inits[node.input[2]].dtype.itemsize

    def compute_of(q: Any) -> Any:
        node = producer.get(q.input[0])
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producer.get(node.input[0])
        return node

    new_nodes, added = [], 0

    def wide(name: str, scale: str, zero: str) -> tuple[str, str]:
        s16, z16 = f"{scale}_x256", f"{zero}_x256"
        for key, value in ((s16, lambda: (inits[scale] / 256).astype(np.float32)),
                           (z16, lambda: (inits[zero].astype(np.int64) * 256).astype(np.uint16))):
            if key not in inits:
                inits[key] = value()
                graph.initializer.append(numpy_helper.from_array(inits[key], key))
        return s16, z16

    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and bits(n)]:
        op = compute_of(q)
        if op is None:
            continue
        dqs = [producer.get(i) for i in op.input if bits(producer.get(i))]
        widths = {bits(d) for d in dqs} | {bits(q)}
        if widths != {8, 16}:
            continue
        for i, name in enumerate(op.input):  # 8-bit inputs: exact u8 -> u16 convert
            dq = producer.get(name)
            if bits(dq) != 8:
                continue
            s16, z16 = wide(name, dq.input[1], dq.input[2])
            new_nodes += [helper.make_node("QuantizeLinear", [name, s16, z16], [f"{name}_u16q_{op.name}"],
                                           name=f"{name}_to_u16_{op.name}"),
                          helper.make_node("DequantizeLinear", [f"{name}_u16q_{op.name}", s16, z16],
                                           [f"{name}_u16_{op.name}"], name=f"{name}_u16_dq_{op.name}")]
            op.input[i] = f"{name}_u16_{op.name}"
            added += 1
        if bits(q) == 8:  # 8-bit output: computed in 16 bits, converted down by the original Q
            src = q.input[0]
            s16, z16 = wide(src, q.input[1], q.input[2])
            new_nodes += [helper.make_node("QuantizeLinear", [src, s16, z16], [f"{src}_u16q"], name=f"{src}_u16"),
                          helper.make_node("DequantizeLinear", [f"{src}_u16q", s16, z16], [f"{src}_u16"],
                                           name=f"{src}_u16_dq")]
            q.input[0] = f"{src}_u16"
            added += 1
    if added:
        graph.node.extend(new_nodes)
        ordered = [onnx.NodeProto.FromString(n.SerializeToString()) for n in _topological(graph)]
        del graph.node[:]
        graph.node.extend(ordered)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return added


def _topological(graph: Any) -> list[Any]:
    """The graph's nodes in an order where each comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, out = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("cycle in the QDQ graph")
        pending = rest
    return out


def _initializers(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
