"""CoreML target: ML Program (.mlpackage) in fp32, fp16, int8 weights-only, or W8A8 from the shared PT2E model.

W8A8 does not use coremltools' own quantization helpers (with torch 2.14 `CoreMLQuantizer` fails to import and
`LinearQuantizer.finalize` gives graphs the converter rejects). Instead the project's one PT2E quantization is
converted directly: its quantize/dequantize nodes carry the scales calibrated in PyTorch and coremltools maps
them onto MIL `quantize`/`dequantize` (activations) and `constexpr_affine_dequantize` (int8 per-channel weights).
Two conversion paths reach the same program: torch.export (default; the PT2E graph as is) and torch.jit.trace
(the PT2E ops rewritten to ATen's quantized-tensor ops, which coremltools' TorchScript frontend reads).

Core ML itself runs only on macOS. Elsewhere the saved program is run by this project's reference ML Program
executor (mlprogram/ in this package: Core ML's op semantics, float16 where the program is float16) and its numbers
are `executed`; on macOS the .mlpackage runs with `predict` (`measured`) and the executor runs the first
verification images again, so the manifest records how far the two disagree.
"""
from __future__ import annotations

import collections
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...config.options import choice, option
from ...errors import UserError
from ...infra.converter_output import captured
from ..base import ExportRequest, Runner, RuntimeTensors, Target
from ..input_adapter import DeployInput
from .mlprogram import ane
from .mlprogram.toolchain import import_coremltools, validated_once

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
_QDQ_OPS = ("quantize", "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
# Oldest OS per artifact kind: constexpr weights need iOS16, activation quantize/dequantize need iOS17.
_MIN_TARGET = {"fp32": "iOS15", "fp16": "iOS15", "int8-weights": "iOS16", "int8": "iOS17"}
_COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
EXECUTION = ("executed (ML Program reference): the saved program run op by op by mnv4_deploy.targets.coreml.mlprogram, "
             "not Core ML")
PREDICT_EXECUTION = "measured (Core ML predict), compared with the ML Program reference executor"
COMPARE_IMAGES = 64  # macOS: images on which predict is compared with the executor


@dataclass(frozen=True)
class CoremlOptions:
    # export: torch.export program (default; what coremltools recommends); trace: torch.jit.trace.
    conversion: str = choice("export", "export", "trace")
    weights_only: bool = option(False, flag="coreml: quantize weights only (W8, float activations)")
    # Stored in the manifest; used for predict on macOS.
    compute_units: str = choice("all", *_COMPUTE_UNITS, flag="coreml: compute units recorded and used by predict")
    minimum_deployment_target: str = option("iOS17", flag="coreml: oldest OS, e.g. iOS17 or macOS14")
    image_input: bool = option(False, flag=(
        "coreml: ImageType input (pixel buffer) with the normalisation as scale/bias"))


class CoremlTarget(Target):
    name = "coreml"
    title = "CoreML"
    extra = "coreml"
    artifact_name = "model.mlpackage"
    work_seconds = 17
    precisions = ("fp32", "fp16", "int8")
    requires = ("coremltools",)
    Options = CoremlOptions

    def __init__(self) -> None:
        # macOS: the predict runner of each artifact, so describe() can report its comparison with the executor.
        self._predict_runs: dict[str, CoremlRunner] = {}

    def distributions(self) -> tuple[str, ...]:
        return ("coremltools",)

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        opts: CoremlOptions = request.options
        kind = _kind(request)
        deployment = _deployment_target(opts.minimum_deployment_target, kind)
        if opts.compute_units not in _COMPUTE_UNITS:
            raise UserError(f"unknown compute units '{opts.compute_units}': use one of {', '.join(_COMPUTE_UNITS)}")
        if opts.conversion not in ("export", "trace"):
            raise UserError(f"unknown coreml conversion '{opts.conversion}': use export or trace")

        if kind == "int8":
            model, method = _w8a8_module(request, opts.conversion), (
                "pt2e -> MIL quantize/dequantize (int8 activations per-tensor with the PT2E-calibrated scales, "
                "int8 weights per-channel symmetric as constexpr_affine_dequantize)")
        else:
            model, method = request.loaded.model, "float"
        info: dict[str, Any] = {"format": "mlprogram", "minimum_deployment_target": opts.minimum_deployment_target,
                                "compute_units": opts.compute_units, "image_input": opts.image_input}
        mlmodel = _convert(model, request, opts, deployment, "fp32" if request.precision == "fp32" else "fp16")
        if kind == "int8-weights":
            mlmodel = _quantize_weights(mlmodel)
            method = "coremltools.optimize.coreml.linear_quantize_weights (int8 per-channel symmetric, fp16 activations)"
        info["method"] = method
        if kind == "int8":
            warning = _calibration_warning(request)
            if warning:
                logger.warning(warning)
                info["calibration_warning"] = warning
        info["conversion"] = ("torch.export -> ct.convert" if opts.conversion == "export"
                              else "torch.jit.trace -> ct.convert")
        info["compute_precision"] = "float32" if request.precision == "fp32" else "float16"
        mlmodel.short_description = f"{request.loaded.name} ({request.precision}{', weights only' if kind == 'int8-weights' else ''})"
        mlmodel.save(str(path))
        return info

    def load(self, path: Path, request: ExportRequest) -> Runner:
        if platform.system() == "Darwin":
            runner = CoremlRunner(path, request)
            self._predict_runs[str(path)] = runner
            return runner
        return ExecutedRunner(path, request)

    def deploys_simulated_model(self, request: ExportRequest) -> bool:
        return super().deploys_simulated_model(request) and not request.options.weights_only

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        """The W8A8 program's quantize outputs, from the reference executor (Core ML's predict, on macOS, does
        not expose intermediates; the executor runs the same saved program on every OS)."""
        from .mlprogram.quantized import quantized_tensors

        if _kind(request) == "int8-weights":
            return "not available: weights-only int8 program (no activation quantizers; activations stay float16)"
        runner = ExecutedRunner(path, request)
        tensors, info = quantized_tensors(runner.executor, runner.feed(x), INPUT_NAME)
        return tensors, info

    def input_spec(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        from ...verify.manifest import input_spec

        pre = request.loaded.preprocessing
        if request.options.image_input:
            spec = input_spec([1, *pre.input_size, 3], pre, dtype="uint8", layout="NHWC",
                              normalization_inside=True)
            spec["coreml_type"] = "ImageType (RGB pixel buffer, e.g. CVPixelBuffer / CGImage)"
            return spec
        return input_spec([1, 3, *pre.input_size], pre)

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        ct = import_coremltools()

        spec = ct.utils.load_spec(str(path))
        ops: collections.Counter = collections.Counter()
        weight_dtypes: collections.Counter = collections.Counter()
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                _walk(block, ops, weight_dtypes)
        float_conv_weights = ops.pop("conv with a float weight", 0)
        ops.pop("const", None)
        plan = _compute_plan(path, "all") if platform.system() == "Darwin" else None
        predicted = self._predict_runs.get(str(path))
        execution: dict[str, Any] = {"execution": EXECUTION if predicted is None else PREDICT_EXECUTION}
        if predicted is not None:
            execution["predict_vs_executor"] = predicted.comparison()
        return {
            **execution,
            "compute_plan": plan or "not available on Linux (MLComputePlan needs macOS 14.4+)",
            # where the program would leave the Neural Engine or run float, judged statically (mlprogram/ane.py)
            "neural_engine_fit": ane.manifest_entry(spec),
            "program": "mlprogram",
            "spec_version": spec.specificationVersion,
            "operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "quantize": ops.get("quantize", 0),
            "dequantize": ops.get("dequantize", 0),
            "constexpr_dequantize": sum(ops.get(o, 0) for o in _QDQ_OPS[2:]),
            "quantize_dequantize_total": sum(ops.get(o, 0) for o in _QDQ_OPS),
            "quantized_weight_dtypes": dict(weight_dtypes),
            "float_conv_weights": float_conv_weights,  # convs whose weight is a plain float constant
            "inputs": [_feature(f) for f in spec.description.input],
            "outputs": [_feature(f) for f in spec.description.output],
        }


def _calibration_warning(request: ExportRequest) -> Optional[str]:
    """Loud when W8A8 ranges come from images that are not the user's (they are fixed in the program)."""
    cal = request.calibration.calibration_set if request.calibration is not None else None
    return ane.calibration_warning(cal.get("name") if cal else None)


def _kind(request: ExportRequest) -> str:
    """fp32 | fp16 | int8-weights | int8 (W8A8)."""
    if request.precision != "int8":
        if request.options.weights_only:
            raise UserError("--weights-only applies to --int8 only: add --int8 or drop --weights-only")
        return request.precision
    if request.options.weights_only:
        return "int8-weights"
    if request.quantized is None:
        raise ValueError("W8A8 CoreML needs the shared PT2E-quantized model")
    return "int8"


def _deployment_target(name: str, kind: str) -> Any:
    ct = import_coremltools()

    valid = [t for t in ct.target.__members__ if t.startswith(("iOS", "macOS", "watchOS", "tvOS"))]
    if name not in ct.target.__members__:
        raise UserError(f"unknown --minimum-deployment-target '{name}': use one of {', '.join(valid)}")
    target, need = ct.target[name], ct.target[_MIN_TARGET[kind]]
    if target < need:
        raise UserError(f"{kind} CoreML models need --minimum-deployment-target {_MIN_TARGET[kind]} "
                        f"or later (the matching macOS/tvOS/watchOS also works), not {name}")
    return target


def _convert(model: Any, request: ExportRequest, opts: CoremlOptions, deployment: Any, precision: str) -> Any:
    ct = import_coremltools()
    import torch

    pre = request.loaded.preprocessing
    example = torch.zeros(1, 3, *pre.input_size)
    if opts.image_input:
        model = DeployInput(model, pre, nhwc=False, raw_pixels=True).eval()
        example = example + 128.0
        inputs = [ct.ImageType(name=INPUT_NAME, shape=tuple(example.shape), scale=1.0, bias=[0.0, 0.0, 0.0],
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape), dtype=np.float32)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the sizes MobileMQA bakes in on purpose
        if opts.conversion == "export":
            source = torch.export.export(model, (example,)).run_decompositions({})
        else:
            source = torch.jit.trace(model, example)
    with captured("coremltools.convert"), validated_once():
        return ct.convert(
            source, inputs=inputs, outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram", minimum_deployment_target=deployment,
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            compute_units=getattr(ct.ComputeUnit, opts.compute_units.upper()), skip_model_load=True,
        )


def _quantize_weights(mlmodel: Any) -> Any:
    """int8 per-channel symmetric weights for every conv/linear/matmul constant (what PT2E quantizes)."""
    import_coremltools()
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0))
    with captured("coremltools linear_quantize_weights"):
        return cto.linear_quantize_weights(mlmodel, config)


def _w8a8_module(request: ExportRequest, conversion: str) -> Any:
    """The shared PT2E int8 graph in the form the chosen coremltools frontend reads."""
    if conversion == "export":
        # torch.export frontend: quantized_decomposed ops map straight onto MIL (de)quantize ops.
        return request.quantized.converted(fold_weights=True)
    return _aten_quantized(request.quantized.converted(fold_weights=False))


def _aten_quantized(gm: Any) -> Any:
    """Rewrite PT2E's quantized_decomposed ops as ATen quantized-tensor ops for jit tracing.

    coremltools' TorchScript frontend knows `quantize_per_tensor`/`quantize_per_channel`/`dequantize` (it
    tracks the scales of quantized tensors) but not torchao's decomposed ops. Numerics are identical.
    """
    import torch

    qd = torch.ops.quantized_decomposed
    qtype = {torch.int8: torch.qint8, torch.uint8: torch.quint8}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == qd.quantize_per_tensor.default:
            x, scale, zero_point, _, _, dtype = node.args
            node.target, node.args, node.kwargs = torch.quantize_per_tensor, (x, float(scale), int(zero_point), qtype[dtype]), {}
        elif node.target == qd.quantize_per_channel.default:
            x, scales, zero_points, axis, _, _, dtype = node.args
            node.target, node.args, node.kwargs = torch.quantize_per_channel, (x, scales, zero_points, axis, qtype[dtype]), {}
        elif node.target in (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default):
            node.target, node.args, node.kwargs = torch.dequantize, (node.args[0],), {}
        elif "quantized_decomposed" in str(node.target):
            raise NotImplementedError(f"no TorchScript form for {node.target}; use the export conversion")
    gm.recompile()
    return gm  # (PT2E graphs refuse .eval(); they were exported in eval mode already)


def _walk(block: Any, ops: collections.Counter, weight_dtypes: collections.Counter) -> None:
    """Count the ops of a MIL block (and nested blocks); note the dtype of compressed weights."""
    consts = {o.outputs[0].name: o.outputs[0].type.tensorType.dataType
              for o in block.operations if o.type == "const" and o.outputs}
    for op in block.operations:
        ops[op.type] += 1
        weight = op.inputs["weight"].arguments if op.type == "conv" and "weight" in op.inputs else []
        if weight and weight[0].name in consts:
            ops["conv with a float weight"] += 1
        if op.type.startswith("constexpr_"):
            if "quantized_data" in op.attributes:  # iOS16/17: constexpr_affine_dequantize
                weight_dtypes[_dtype_name(op.attributes["quantized_data"].type.tensorType.dataType)] += 1
            elif "data" in op.inputs and op.inputs["data"].arguments:  # iOS18: constexpr_blockwise_shift_scale
                code = consts.get(op.inputs["data"].arguments[0].name)
                if code is not None:
                    weight_dtypes[_dtype_name(code)] += 1
        for inner in op.blocks:
            _walk(inner, ops, weight_dtypes)


def _dtype_name(code: int) -> str:
    import_coremltools()
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code).lower()


def _feature(feature: Any) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    out: dict[str, Any] = {"name": feature.name, "type": kind}
    if kind == "multiArrayType":
        t = feature.type.multiArrayType
        out["shape"] = list(t.shape)
        import_coremltools()
        from coremltools.proto import FeatureTypes_pb2

        out["dtype"] = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(t.dataType).lower()
    elif kind == "imageType":
        t = feature.type.imageType
        import_coremltools()
        from coremltools.proto import FeatureTypes_pb2

        out.update(width=t.width, height=t.height,
                   color=FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(t.colorSpace))
    return out


class ExecutedRunner(Runner):
    """Any OS: the saved ML Program run op by op by the reference executor (mnv4_deploy/targets/coreml/mlprogram)."""

    numbers = "executed"
    threads = 1  # the executor's intra-op threads (batch-1 ops on small tensors)

    def __init__(self, path: Path, request: ExportRequest) -> None:
        from .mlprogram import load

        self.executor = load(path)
        self.image_input = request.options.image_input
        pre = request.loaded.preprocessing
        self.mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(pre.std, dtype=np.float32).reshape(1, 3, 1, 1)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """The program's input for normalised NCHW images (RGB pixel values 0-255 for an ImageType input, as
        Core ML hands a pixel buffer to the program)."""
        x = np.asarray(x, dtype=np.float32)
        if self.image_input:
            return np.clip(np.round((x * self.std + self.mean) * 255.0), 0, 255).astype(np.float32)
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = self.executor.run({INPUT_NAME: self.feed(x)})[OUTPUT_NAME]
        return np.asarray(logits, dtype=np.float32).reshape(len(x), -1)


class CoremlRunner(Runner):
    """macOS: the .mlpackage run by CoreML itself (`predict`), on the requested compute units."""

    def __init__(self, path: Path, request: ExportRequest) -> None:
        ct = import_coremltools()

        self.executed = ExecutedRunner(path, request)
        self._sample: Optional[tuple[np.ndarray, np.ndarray]] = None  # first images seen, with predict's logits
        opts: CoremlOptions = request.options
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, opts.compute_units.upper()))
        self.image_input = opts.image_input
        pre = request.loaded.preprocessing
        self.mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(pre.std, dtype=np.float32).reshape(1, 3, 1, 1)

    @property
    def max_batch(self) -> Optional[int]:
        return 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image

        outs = []
        for one in np.asarray(x, dtype=np.float32):
            if self.image_input:
                rgb = np.clip(np.round((one[None] * self.std + self.mean) * 255.0), 0, 255)[0]
                feed: Any = Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8), "RGB")
            else:
                feed = one[None]
            outs.append(np.asarray(self.model.predict({INPUT_NAME: feed})[OUTPUT_NAME], dtype=np.float32).reshape(1, -1))
        predicted = np.concatenate(outs)
        if self._sample is None:  # kept for comparison(); the executor does not run here, so latency stays predict's
            self._sample = (np.array(x[:COMPARE_IMAGES], dtype=np.float32), predicted[:COMPARE_IMAGES].copy())
        return predicted

    def comparison(self) -> dict[str, Any]:
        """Core ML's predict against the reference executor on the first images predict ran (the verification
        images): how far Core ML's arithmetic is from the executor's model of it."""
        if self._sample is None:
            return {"images": 0}
        from ...verify.fidelity import compare

        x, predicted = self._sample
        fid = compare(predicted, self.executed(x)).to_dict()
        return {k: fid[k] for k in ("images", "cosine", "top1_agreement", "max_abs_error")}


def _compute_plan(path: Path, compute_units: str) -> Optional[dict[str, Any]]:
    """Where each op runs (MLComputePlan, macOS 14.4+): an int8 model falling back to CPU is ~100x slower."""
    try:
        ct = import_coremltools()
        import_coremltools()
        from coremltools.models.compute_plan import MLComputePlan

        compiled = ct.models.utils.compile_model(str(path))
        plan = MLComputePlan.load_from_path(path=compiled, compute_units=getattr(ct.ComputeUnit, compute_units.upper()))
        program = plan.model_structure.program
        devices: collections.Counter = collections.Counter()
        for function in program.functions.values():
            for op in function.block.operations:
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                devices[type(usage.preferred_compute_device).__name__ if usage else "none"] += 1
        return dict(devices)
    except Exception as exc:  # an optional diagnostic: never fail verification for it
        return {"error": f"{type(exc).__name__}: {exc}"}
