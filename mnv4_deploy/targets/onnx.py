"""ONNX target: dynamo export, int8 as QDQ (from the shared PT2E model), verified in onnxruntime CPU."""
from __future__ import annotations

import collections
import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..quantize import export_program
from ..recipes import choice
from .base import ExportRequest, Runner, Target

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
    threads: int = 0  # onnxruntime intra-op threads for verification and latency (0 = runtime default)


class OnnxTarget(Target):
    name = "onnx"
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
            info["method"] = "pt2e -> QDQ (int8 weights per-channel symmetric, int8 activations per-tensor)"
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
        return info

    def load(self, path: Path, request: ExportRequest) -> Runner:
        return OnnxRunner(path, request.options.threads)

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> Any:
        if request.options.method != "pt2e":
            return "not applicable: quantized by onnxruntime's quantize_static, not the shared PT2E model"
        from ..tensorwise import onnx_quantized

        return onnx_quantized(path, x)

    def describe(self, path: Path) -> dict[str, Any]:
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
        }


def _export(model: Any, example: Any, path: Path, opset: int) -> None:
    import torch

    program = export_program(model, example)
    # The exporter prints progress lines; keep the CLI's own output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            program, (example,), str(path), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
        )


def _ort_quantize_static(float_path: Path, path: Path, request: ExportRequest, opts: OnnxOptions) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = request.calibration
    if calib is None:
        raise ValueError("onnxruntime quantize_static needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib.x[i:i + 1] for i in range(len(calib)))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(
        str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ,
        per_channel=opts.ort_per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, opts.ort_calibrate_method),
    )
    return {"method": f"onnxruntime.quantize_static (QDQ, per_channel={opts.ort_per_channel}, "
                      f"{opts.ort_calibrate_method} calibration, {len(calib)} images)"}


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
