"""ONNX target: dynamo export, int8 as QDQ (from the shared PT2E model), verified in onnxruntime CPU."""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..capture import captured
from ..options import choice, option
from ..quantize import export_program
from ..tensorwise import QTensor, close_qparams, signed_values, signed_zero_point
from .base import ExportRequest, Runner, RuntimeTensors, Target

INPUT_NAME, OUTPUT_NAME = "input", "logits"


INT16_OPSET = 21  # first opset whose QuantizeLinear/DequantizeLinear take int16


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = choice(18, 17, 18, 19, 20, 21)
    # pt2e: the project's shared quantization exported as QDQ. onnxruntime: onnxruntime's own
    # quantize_static on the float model, kept as the baseline the report compares against.
    method: str = choice("pt2e", "pt2e", "onnxruntime")
    ort_per_channel: bool = False  # onnxruntime method only (its default is per-tensor)
    ort_calibrate_method: str = choice("MinMax", "MinMax", "Entropy", "Percentile")
    threads: int = option(0, low=0, high=1024)  # onnxruntime intra-op threads for verification and latency (0 = runtime default)
    # The 8-bit type of activations (pt2e method): the same values either way (int8 zero point z = uint8 z+128).
    activation_dtype: str = choice("uint8", "uint8", "int8", flag=(
        "onnx: 8-bit activation type of int8 artifacts: uint8 (default) is what onnxruntime's CPU provider fuses "
        "into integer kernels on x86; int8 for ARM or NPU execution providers that want signed activations"))


class OnnxTarget(Target):
    name = "onnx"
    title = "ONNX"
    extra = "onnx"
    artifact_name = "model.onnx"
    precisions = ("fp32", "int8")
    requires = ("onnx", "onnxruntime", "onnxscript")
    Options = OnnxOptions
    int16_activations = True  # int16 QuantizeLinear/DequantizeLinear (opset 21): what QNN's w8a16 consumes

    def distributions(self) -> tuple[str, ...]:
        return ("onnx", "onnxruntime", "onnxscript")

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        opts: OnnxOptions = request.options
        info: dict[str, Any] = {"opset": opts.opset, "exporter": "torch.onnx.export(dynamo=True)"}
        if request.precision == "int8" and opts.method == "onnxruntime":
            with tempfile.TemporaryDirectory() as tmp:
                float_path = Path(tmp) / "float.onnx"
                _export(request.loaded.model, request.example, float_path, opts.opset)
                info.update(_ort_quantize_static(float_path, path, request, opts))
            return info
        opset = opts.opset
        if request.precision == "int8":
            model = request.quantized.converted(fold_weights=True)
            info["method"] = (f"pt2e -> QDQ (int8 weights per-channel symmetric, {opts.activation_dtype} "
                              "activations per-tensor)")
            info["activation_dtype"] = opts.activation_dtype
            if request.quantized.int16_sites:
                opset = max(opset, INT16_OPSET)
                info["method"] += f", int16 activations at {len(request.quantized.int16_sites)} fallback sites"
                if opset != opts.opset:
                    info["opset"] = opset
                    info["opset_note"] = f"raised from {opts.opset}: int16 QuantizeLinear needs opset {INT16_OPSET}"
        else:
            model = request.loaded.model
            info["method"] = "float"
        _export(model, request.example, path, opset)
        if request.precision == "int8" and opts.activation_dtype == "uint8":
            info["uint8_activation_zero_points"] = activations_to_uint8(path)
        return info

    def load(self, path: Path, request: ExportRequest) -> Runner:
        return OnnxRunner(path, request.options.threads)

    def deploys_simulated_model(self, request: ExportRequest) -> bool:
        return super().deploys_simulated_model(request) and request.options.method == "pt2e"

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        return runtime_quantized_tensors(path, x)

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        import onnx

        model = onnx.load(str(path))
        ops = collections.Counter(n.op_type for n in model.graph.node)
        init_dtypes = collections.Counter(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer)
        return {
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0),
            "initializer_dtypes": dict(init_dtypes),
            "inputs": [_value_spec(v) for v in model.graph.input],
            "outputs": [_value_spec(v) for v in model.graph.output],
            "int8_compute": int8_compute(path),
        }


# Compute ops in the graph onnxruntime executes: integer kernels, and their float counterparts.
_ORT_INT8_COMPUTE = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                     "DynamicQuantizeMatMul")
_ORT_FLOAT_COMPUTE = ("Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm")


def int8_compute(path: Path) -> dict[str, Any]:
    """Which convolutions and matmuls onnxruntime's CPU provider really runs with integer kernels, read from the
    graph it executes (its optimized model: QDQ fusion, layout transforms), not from the exported file."""
    nodes = _optimized_graph(path).graph.node
    compute = [n for n in nodes if n.op_type in _ORT_INT8_COMPUTE + _ORT_FLOAT_COMPUTE]
    integer = [n for n in compute if n.op_type in _ORT_INT8_COMPUTE]
    return {"int8": len(integer), "total": len(compute),
            "float": [f"{n.name} ({n.op_type})" for n in compute if n.op_type in _ORT_FLOAT_COMPUTE],
            "adds_int8": sum(n.op_type in ("QLinearAdd", "QLinearMul") for n in nodes),
            "adds_float": sum(n.op_type in ("Add", "Mul") for n in nodes),
            "source": "onnxruntime CPUExecutionProvider's optimized graph (ORT_ENABLE_ALL)"}


def activations_to_uint8(path: Path) -> int:
    """Rewrite the artifact's int8 activation QuantizeLinear/DequantizeLinear pairs as uint8 (zero point + 128,
    same scale): exactly the same real values, but the type onnxruntime's CPU provider needs on x86.

    There it fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv only for uint8 activations (signed
    activations are an ARM path); it converts int8 pairs itself only where a QuantizeLinear has one consumer, so
    every MNv4 residual branch stayed a float Conv between Q/DQ. Weights stay int8 (per-channel, symmetric), and
    int16 fallback sites stay int16. Returns how many zero points were rewritten.
    """
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


def _export(model: Any, example: Any, path: Path, opset: int) -> None:
    import torch

    program = export_program(model, example)
    with captured("torch.onnx.export"):
        torch.onnx.export(
            program, (example,), str(path), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
        )


def _ort_quantize_static(float_path: Path, path: Path, request: ExportRequest, opts: OnnxOptions) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader

    calib = request.calibration
    if calib is None:
        raise ValueError("onnxruntime quantize_static needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib.x[i:i + 1] for i in range(len(calib)))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch}

    with captured("onnxruntime.quantization.quantize_static"):
        _quantize_static(float_path, path, Reader(), opts)
    return {"method": f"onnxruntime.quantize_static (QDQ, per_channel={opts.ort_per_channel}, "
                      f"{opts.ort_calibrate_method} calibration, {len(calib)} images)"}


def _quantize_static(float_path: Path, path: Path, reader: Any, opts: OnnxOptions) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(float_path), str(path), reader, quant_format=QuantFormat.QDQ,
        per_channel=opts.ort_per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, opts.ort_calibrate_method),
    )


def _value_spec(value: Any) -> dict[str, Any]:
    import onnx

    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": value.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.threads = threads or f"onnxruntime default (one per physical core; {os.cpu_count()} logical here)"
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self._max_batch = shape[0] if isinstance(shape[0], int) else None

    @property
    def max_batch(self) -> Optional[int]:
        return self._max_batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


# ----------------------------------------------------------------------------- intermediates (tensor-by-tensor)
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
    deployed = OnnxRunner(path)(feed_x)
    model = _optimized_graph(path)
    tensors, notes = _quantized_tensor_params(model.graph)
    values, logits = _run_exposed(model, tensors, feed_x)
    out = [QTensor(name, scale, signed_zero_point(int(zero), zero.dtype), signed_values(values[name], zero.dtype), i,
                   op=op, note=notes.get(name, "")) for i, (name, (scale, zero, op)) in enumerate(tensors.items())]
    nodes = model.graph.node
    info = {"runtime": "onnxruntime CPUExecutionProvider: its optimized (QDQ-fused) graph, 8-bit tensors exposed",
            "runtime_integer_ops": sum(1 for n in nodes if n.op_type.startswith("QLinear") or n.op_type == "QGemm"),
            "runtime_float_ops_between_dq_q": sum(1 for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul", "Add")),
            "exposed_run_vs_deployed_logits_max_abs": float(np.abs(logits - deployed).max())}
    return out, info


def _optimized_graph(path: Path) -> Any:
    """The graph onnxruntime builds from the artifact at its default optimization level (as the runner and apps
    use it): the exposed run then reproduces the deployed session's logits bit for bit."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = ort.SessionOptions()
        opt.log_severity_level = 3
        opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opt.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opt, providers=["CPUExecutionProvider"])
        return onnx.load(opt.optimized_model_filepath)


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


def _run_exposed(model: Any, tensors: dict[str, tuple[float, np.ndarray, str]],
                 x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run the optimized graph unoptimized, with `tensors` added as outputs: their values, and the logits."""
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
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x})))
    return values, values[outputs[0]]
