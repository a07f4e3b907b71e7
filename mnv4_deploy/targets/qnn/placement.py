"""What QNN did with the model, for the manifest: where each node went (its framework op trace of the context
compile), how the QDQ model's quantization compares with what QNN documents for HTP, and which convolutions
and matmuls the NPU runs on 8-bit (or 16-bit) activations."""
from __future__ import annotations

import collections
import re
from typing import Any, Optional

import numpy as np

from .context import TRACE, refusal_reason

COMPUTE = ("Conv", "Gemm", "MatMul")
QNN_COMPUTE = ("Conv2d", "DepthWiseConv2d", "TransposeConv2d", "FullyConnected", "MatMul")
_TOKEN = re.compile(r"_token_\d+$")


def placement_record(model: Any, trace: dict[str, Any]) -> dict[str, Any]:
    """Where QNN put every node, from its framework op trace of the context-binary compile.

    Node names are those of the graph onnxruntime hands to QNN: its NHWC layout transform inserts Transposes
    and renames the nodes it rewrites (suffix `_token_N`), so counts there differ from the QDQ file's."""
    summary = trace.get("summary", {})
    placed = [{"qnn_op": m.get("dst_qnn_op_type"), "qnn_node": m.get("dst_name"),
               "onnx_nodes": [s["name"] for s in m.get("sources", []) if s.get("type") == "OP"]}
              for g in trace.get("subgraph_traces", []) for m in g.get("op_mappings", [])]
    refused = [{"node": r.get("node_name"), "op": r.get("op_type"), "reason": refusal_reason(r)}
               for r in trace.get("unsupported_nodes", [])]
    socs = [s.get("compilation_target", {}) for s in trace.get("soc_traces", [])]
    return {
        "backend": f"QNN HTP ({trace.get('backend_type')}), emulated on x86_64",
        "compiled_for": socs,
        "whole_model_on_htp": not refused and summary.get("supported_nodes") == summary.get("total_onnx_nodes"),
        "qdq_model_nodes": len(model.graph.node),
        "nodes_seen_by_qnn": summary.get("total_onnx_nodes"),
        "nodes_on_htp": summary.get("supported_nodes"),
        "nodes_left_off_htp": len(refused),
        "left_off_htp": refused,
        "qnn_subgraphs": summary.get("qnn_subgraphs"),
        "qnn_ops": dict(collections.Counter(p["qnn_op"] for p in placed)),
        "placed": placed,
        "source": f"QNN EP framework op trace ({TRACE} beside the context model)",
        "note": "node names as in the graph onnxruntime hands to QNN (its NHWC layout transform renames some "
                "with _token_N and adds Transposes)",
    }


def initializers(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def htp_quantization(model: Any) -> dict[str, Any]:
    """The QDQ model against what QNN documents for HTP: uint8/uint16 activations, int8/uint8 weights
    (per-channel only for Conv/Gemm weights), MatMul per-tensor. Lists every departure."""
    inits = initializers(model)
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n)
    activations: collections.Counter = collections.Counter()
    weights: collections.Counter = collections.Counter()
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        zero, scale = inits[n.input[2]], inits.get(n.input[1])
        per_channel = scale is not None and scale.size > 1
        if n.input[0] in inits:  # a weight (or bias) DequantizeLinear
            weights[f"{zero.dtype.name}{' per-channel' if per_channel else ' per-tensor'}"] += 1
            users = {c.op_type for c in consumers[n.output[0]]}
            if zero.dtype not in (np.int8, np.uint8, np.int32):
                problems.append(f"{n.name}: weight type {zero.dtype.name}")
            if per_channel and not users <= {"Conv", "Gemm", "ConvTranspose"}:
                problems.append(f"{n.name}: per-channel weight feeding {sorted(users)}")
        elif n.op_type == "QuantizeLinear":
            activations[zero.dtype.name] += 1
            if zero.dtype not in (np.uint8, np.uint16):
                problems.append(f"{n.name}: activation type {zero.dtype.name}")
            if per_channel:
                problems.append(f"{n.name}: per-channel activation")
    return {"activation_quantizers": dict(activations), "weight_dequantizers": dict(weights),
            "conforms": not problems, "departures": problems[:20],
            "rule": "QNN HTP: uint8/uint16 activations per-tensor, int8/uint8 weights, per-channel only on "
                    "Conv/Gemm weights (MatMul per-tensor)"}


def _activation_bits(model: Any) -> dict[str, Optional[int]]:
    """Each compute node's activation input: 8, 16 (quantized) or None (float)."""
    inits = initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, Optional[int]] = {}
    for n in model.graph.node:
        if n.op_type not in COMPUTE:
            continue
        dq = producers.get(n.input[0])
        zero = inits.get(dq.input[2]) if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) > 2 else None
        out[n.name] = None if zero is None else 8 * zero.dtype.itemsize
    return out


def compute_record(model: Any, placement: dict[str, Any]) -> dict[str, Any]:
    """Convolutions and matmuls the NPU runs on integer inputs: every one QNN placed with 8-bit activations
    (16-bit ones counted apart), from the QDQ model's types and QNN's placement."""
    bits = _activation_bits(model)
    left_off = {_TOKEN.sub("", r["node"] or "") for r in placement["left_off_htp"]}
    on_htp = {k: v for k, v in bits.items() if k not in left_off}
    qnn_compute = sum(v for k, v in placement["qnn_ops"].items() if k in QNN_COMPUTE)
    return {"int8": sum(1 for v in on_htp.values() if v == 8), "int16": sum(1 for v in on_htp.values() if v == 16),
            "total": len(bits), "qnn_compute_ops": qnn_compute,
            "float": [f"{k} ({'float input' if v is None else 'left off HTP'})" for k, v in bits.items()
                      if v is None or k in left_off],
            "source": "QDQ model activation types + QNN placement (framework op trace)"}
