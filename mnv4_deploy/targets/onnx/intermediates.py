"""The ONNX artifact's int8 intermediates for the tensor-by-tensor check (mnv4_deploy/verify/tensorwise.py), read
from the graph onnxruntime's CPU provider executes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ...verify.tensorwise import QTensor, close_qparams, signed_values, signed_zero_point
from .runtime import OnnxRunner, optimized_graph

# Where onnxruntime's fused integer ops keep their output scale and zero point (input positions).
_ORT_OUTPUT_QPARAMS = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QGemm": (7, 8),
                       "QLinearAdd": (6, 7), "QLinearMul": (6, 7), "QLinearAveragePool": (3, 4),
                       "QLinearGlobalAveragePool": (3, 4), "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4),
                       "QLinearSoftmax": (3, 4), "QLinearReduceMean": (3, 4)}
# Where they keep the parameters they read their 8-bit inputs with: {op: ((input, scale, zero point), ...)}.
_ORT_INPUT_QPARAMS = {"DequantizeLinear": ((0, 1, 2),), "QLinearConv": ((0, 1, 2),), "QGemm": ((0, 1, 2),),
                      "QLinearMatMul": ((0, 1, 2), (3, 4, 5)), "QLinearAdd": ((0, 1, 2), (3, 4, 5)),
                      "QLinearMul": ((0, 1, 2), (3, 4, 5)), "QLinearAveragePool": ((0, 1, 2),),
                      "QLinearGlobalAveragePool": ((0, 1, 2),), "QLinearSigmoid": ((0, 1, 2),),
                      "QLinearLeakyRelu": ((0, 1, 2),), "QLinearSoftmax": ((0, 1, 2),)}
_ORT_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity")
QParams = tuple[float, np.ndarray]  # scale, zero point (its dtype is the tensor's)


def runtime_quantized_tensors(path: Path, x: np.ndarray) -> tuple[list[QTensor], dict[str, Any]]:
    """onnxruntime CPU, with every 8-bit activation of its *optimized* graph exposed as a graph output.

    Exposing QuantizeLinear outputs of the artifact itself would change what onnxruntime runs: it stops
    fusing DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv when the output is a graph output.
    So the graph onnxruntime makes of the artifact (QDQ fusion, int8 -> uint8 activations, layout) is saved
    first, and that graph runs with its 8-bit tensors exposed and no further optimization: the values are
    those of the fused integer kernels (its logits are checked against the deployed session's).
    """
    feed_x = np.ascontiguousarray(x, np.float32)
    ex = _exposed(path)
    deployed = ex.deployed(feed_x)
    values = dict(zip(ex.outputs, ex.session.run(None, {ex.input_name: feed_x})))
    logits = values[ex.logits]
    out = [QTensor(name, scale, signed_zero_point(int(zero), zero.dtype), signed_values(values[name], zero.dtype), i,
                   op=op, note=ex.notes.get(name, "")) for i, (name, (scale, zero, op)) in enumerate(ex.tensors.items())]
    info = ex.info | {"exposed_run_vs_deployed_logits_max_abs": float(np.abs(logits - deployed).max())}
    return out, info


@dataclass
class _Exposed:
    """One artifact's two sessions (as deployed; its optimized graph with the 8-bit tensors exposed)."""

    deployed: OnnxRunner
    session: Any
    input_name: str
    outputs: list[str]
    logits: str
    tensors: dict[str, tuple[float, np.ndarray, str]]
    notes: dict[str, str]
    info: dict[str, Any]


_SESSIONS: dict[tuple[str, int, int], _Exposed] = {}
_KEEP = 4


def _exposed(path: Path) -> _Exposed:
    """The sessions of the artifact at `path`, opened once per file (by path, size and modification time):
    `mnv4-deploy debug` reads it on image chunk after chunk, and opening costs more than running a chunk."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SESSIONS:
        while len(_SESSIONS) >= _KEEP:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        model = optimized_graph(path)
        tensors, notes = _quantized_tensor_params(model.graph)
        nodes = model.graph.node
        info = {"runtime": "onnxruntime CPUExecutionProvider: its optimized (QDQ-fused) graph, 8-bit tensors exposed",
                "runtime_integer_ops": sum(1 for n in nodes if n.op_type.startswith("QLinear") or n.op_type == "QGemm"),
                "runtime_float_ops_between_dq_q": sum(1 for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul", "Add"))}
        logits = model.graph.output[0].name
        session = _exposed_session(model, tensors)
        _SESSIONS[key] = _Exposed(OnnxRunner(path), session, session.get_inputs()[0].name,
                                  [o.name for o in session.get_outputs()], logits, tensors, notes, info)
    return _SESSIONS[key]


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


def _qparams(consts: dict[str, np.ndarray], names: Sequence[str], k: tuple[int, int]) -> Optional[QParams]:
    """The per-tensor scale and 8/16-bit zero point at input positions `k` of a node, if constant."""
    if len(names) <= k[1] or names[k[0]] not in consts or names[k[1]] not in consts:
        return None
    scale, zero = consts[names[k[0]]], consts[names[k[1]]]
    if scale.size != 1 or zero.size != 1 or zero.dtype not in (np.int8, np.uint8, np.int16):
        return None
    return float(scale.reshape(())), zero.reshape(())


def _quantized_tensor_params(graph: Any) -> tuple[dict[str, tuple[float, np.ndarray, str]], dict[str, str]]:
    """Every quantized activation: {name: (scale, zero point, producing op)}, and notes where the runtime writes
    a tensor with one scale and reads it with another. Consumers (a DequantizeLinear) decide what the values
    mean, else the producer's output parameters; layout ops pass their input's on."""
    consts = _constants(graph)
    read_as: dict[str, list[tuple[float, np.ndarray, str]]] = {}
    for n in graph.node:
        for i, k_scale, k_zero in _ORT_INPUT_QPARAMS.get(n.op_type, ()):
            if len(n.input) > k_zero and n.input[i] not in consts:
                found = _qparams(consts, list(n.input), (k_scale, k_zero))
                if found is not None:
                    read_as.setdefault(n.input[i], []).append((*found, n.op_type))
    tensors: dict[str, tuple[float, np.ndarray, str]] = {}
    notes: dict[str, str] = {}
    for n in graph.node:
        if not n.output or n.output[0] in consts:
            continue
        if n.op_type in _ORT_OUTPUT_QPARAMS:
            found = _qparams(consts, list(n.input), _ORT_OUTPUT_QPARAMS[n.op_type])
        elif n.op_type in _ORT_LAYOUT_OPS and n.input and n.input[0] in tensors:
            found = tensors[n.input[0]][:2]
        else:
            found = None
        readers = read_as.get(n.output[0], [])
        for r in readers:  # the runtime itself disagrees: written with one scale, read with another
            if found is not None and not close_qparams(found[0], int(found[1]), r[0], int(r[1])):
                notes[n.output[0]] = (f"written with scale {found[0]:.6g} zero point {int(found[1])} by {n.op_type} "
                                      f"but read with scale {r[0]:.6g} zero point {int(r[1])} by {r[2]}")
        if readers:
            found = readers[0][:2]
        if found is not None:
            tensors[n.output[0]] = (found[0], found[1], n.op_type)
        else:
            notes.pop(n.output[0], None)
    return tensors, notes


def _exposed_session(model: Any, tensors: dict[str, tuple[float, np.ndarray, str]]) -> Any:
    """A session of the optimized graph, unoptimized, with `tensors` added as outputs."""
    import onnx
    import onnxruntime as ort

    graph = model.graph
    outputs = [o.name for o in graph.output]
    for name, (_, zero, _) in tensors.items():
        if name not in outputs:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(zero.dtype), None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
