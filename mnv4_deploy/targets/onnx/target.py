"""ONNX target: dynamo export, int8 as QDQ (from the shared PT2E model), verified in onnxruntime CPU.

The package: target.py (the target), export.py (the shared ONNX export, which qnn uses too), runtime.py
(onnxruntime's runner and optimized graph), intermediates.py (the tensor-by-tensor check's int8 tensors),
ort_baseline.py (onnxruntime's own quantize_static, the baseline method), passes/ (QDQ graph rewrites).
"""
from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config.options import choice, option
from ..base import ExportRequest, Runner, RuntimeTensors, Target
from .export import DEFAULT_OPSET, INT16_OPSET, export_onnx
from .intermediates import runtime_quantized_tensors
from .ort_baseline import ort_quantize_static
from .passes.unsigned_activations import activations_to_uint8
from .runtime import OnnxRunner, optimized_graph


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = choice(DEFAULT_OPSET, 17, 18, 19, 20, 21)
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
    work_seconds = 12
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
                export_onnx(request.loaded.model, request.example, float_path, opts.opset)
                info.update(ort_quantize_static(float_path, path, request, opts))
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
        export_onnx(model, request.example, path, opset)
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
    nodes = optimized_graph(path).graph.node
    compute = [n for n in nodes if n.op_type in _ORT_INT8_COMPUTE + _ORT_FLOAT_COMPUTE]
    integer = [n for n in compute if n.op_type in _ORT_INT8_COMPUTE]
    return {"int8": len(integer), "total": len(compute),
            "float": [f"{n.name} ({n.op_type})" for n in compute if n.op_type in _ORT_FLOAT_COMPUTE],
            "adds_int8": sum(n.op_type in ("QLinearAdd", "QLinearMul") for n in nodes),
            "adds_float": sum(n.op_type in ("Add", "Mul") for n in nodes),
            "source": "onnxruntime CPUExecutionProvider's optimized graph (ORT_ENABLE_ALL)"}


def _value_spec(value: Any) -> dict[str, Any]:
    import onnx

    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": value.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}
