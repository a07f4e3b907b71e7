"""TFLite / LiteRT target: litert-torch conversion, verified in ai_edge_litert's interpreter (XNNPACK).

fp32: plain conversion. fp16: float16 weights (ai-edge-quantizer float casting through litert-torch's
`full_fp16_recipe`; DEQUANTIZE ops feed float kernels). int8: the project's shared PT2E model converted with
litert-torch's QDQ lowering into int8 kernels. Hybrids' attention softmax is marked as litert's `odml.softmax`
composite (`softmax_composites`), so it becomes the fused SOFTMAX builtin (int8 in int8 models) instead of
float REDUCE_MAX/EXP/SUM/DIV: with the int8 attention matmuls from the shared quantizer, hybrids are
full-integer too.

I/O is the deployer's choice: `io_dtype` float keeps QUANTIZE/DEQUANTIZE inside the model; int8/uint8 give a
full-integer model (EdgeTPU, NNAPI) whose input is quantized with the model's own scale/zero point.
`layout: nhwc` and `bake_normalization` wrap the PyTorch model before conversion, so the graph itself takes
NHWC raw RGB and the converter folds the layout transposes away.

The package: target.py (the target, conversion, the interpreter runner, graph inspection, intermediates),
io_dtype.py (the flatbuffer's I/O retyped), passes/softmax_composites.py (the graph rewrite before conversion).
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...config.options import choice, option
from ...errors import UserError, VerificationError
from ...infra.converter_output import captured
from ...verify.tensorwise import QTensor, signed_values, signed_zero_point
from ..base import ExportRequest, Runner, RuntimeTensors, Target
from ..input_adapter import DeployInput
from .io_dtype import set_io_dtype
from .passes.softmax_composites import softmax_composites

_FLOAT_DTYPES = (np.float32, np.float16, np.float64)


@dataclass(frozen=True)
class TfliteOptions:
    # float: float input/output, (de)quantize inside. int8/uint8: full-integer model, integer I/O (EdgeTPU).
    io_dtype: str = choice("float", "float", "int8", "uint8", flag=(
        "tflite: float keeps (de)quantize inside the model; int8/uint8 = full-integer I/O (EdgeTPU)"))
    # nhwc: the graph takes NHWC (what camera buffers and mobile runtimes use); no transpose in the model.
    layout: str = choice("nchw", "nchw", "nhwc", flag="tflite: input layout (nhwc avoids transposes on mobile)")
    # The model takes raw 0..255 RGB and normalises inside (folded into the stem convolution).
    bake_normalization: bool = option(False, flag=(
        "tflite: put mean/std normalisation inside the model, so apps feed raw RGB"))
    # Fixed interpreter (XNNPACK) thread count, so latency numbers compare; 0 = LiteRT's default.
    threads: int = option(2, low=0, high=1024)


class TfliteTarget(Target):
    name = "tflite"
    title = "TFLite/LiteRT"
    extra = "tflite"
    artifact_name = "model.tflite"
    work_seconds = 14
    exports_in_worker = True  # litert-torch's conversion: the slowest of the four default targets
    precisions = ("fp32", "fp16", "int8")
    requires = ("litert_torch", "ai_edge_litert")
    Options = TfliteOptions

    def distributions(self) -> tuple[str, ...]:
        return ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "litert-converter")

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        opts: TfliteOptions = request.options
        check_options(opts, request.precision)
        start = time.perf_counter()
        model = deploy_module(request.loaded.model, request.loaded.preprocessing, opts)
        example = torch.zeros(example_shape(request.loaded.preprocessing.input_size, opts))
        info: dict[str, Any] = {
            "converter": "litert_torch.convert",
            "io_dtype": opts.io_dtype,
            "layout": opts.layout.upper(),
            "normalization_inside": opts.bake_normalization,
        }
        if request.precision == "int8":
            content = _export_int8(request, model, example, info)
        elif request.precision == "fp16":
            from litert_torch.generative.quantize.quant_recipes import full_fp16_recipe

            info["method"] = "float16 weights (ai-edge-quantizer float casting), float32 compute and I/O"
            content = _convert(float_graph(model, example), example, full_fp16_recipe())
        else:
            info["method"] = "float"
            content = _convert(float_graph(model, example), example, None)
        Path(path).write_bytes(content)
        info["seconds"] = round(time.perf_counter() - start, 2)
        return info

    def load(self, path: Path, request: ExportRequest) -> Runner:
        opts: TfliteOptions = request.options
        if request.precision == "int8" and opts.io_dtype != "float":
            left = float_ops(path)
            if left:
                listed = ", ".join(f"{name} x{n}" for name, n in sorted(left.items(), key=lambda kv: -kv[1]))
                raise VerificationError(
                    f"full-integer ({opts.io_dtype} I/O) was asked but {sum(left.values())} ops still run in "
                    f"float: {listed}; use --io-dtype float to ship it with float fallbacks")
        return TfliteRunner(path, request.loaded.preprocessing, opts)

    def deploys_simulated_model(self, request: ExportRequest) -> bool:
        # NHWC / baked-normalisation artifacts are re-quantized on the wrapped model: not the shared PT2E one.
        return super().deploys_simulated_model(request) and not needs_wrapper(request.options)

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        return runtime_quantized_tensors(path, request, x)

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        ops, tensors = graph(path)
        inputs, outputs = _io(path)
        counts = collections.Counter(op["op_name"] for op in ops)
        floats = collections.Counter(op["op_name"] for op in ops if _is_float_op(op, tensors))
        integer = sum(1 for op in ops if _is_integer_op(op, tensors))
        macs = sum(op_macs(op, tensors) for op in ops)
        return {
            "operators": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "ops_total": len(ops),
            "ops_int8": integer,
            "ops_float": sum(floats.values()),
            "float_ops": dict(sorted(floats.items(), key=lambda kv: -kv[1])),
            "full_integer": not floats,
            "estimated_macs": macs,
            "macs_note": "CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL from tensor shapes",
            "inputs": [_tensor_spec(tensors[i]) for i in inputs],
            "outputs": [_tensor_spec(tensors[i]) for i in outputs],
            "int8_compute": _int8_compute(ops, tensors),
        }

    def input_spec(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        from ...verify.manifest import input_spec

        opts: TfliteOptions = request.options
        detail = _interpreter(path, delegates=False).get_input_details()[0]
        scale, zero = detail["quantization"]
        quant = {"scale": float(scale), "zero_point": int(zero)} if np.issubdtype(detail["dtype"], np.integer) else None
        spec = input_spec([int(d) for d in detail["shape"]], request.loaded.preprocessing,
                          np.dtype(detail["dtype"]).name, opts.layout.upper(), opts.bake_normalization, quant)
        if opts.bake_normalization:
            spec["normalization"]["feed"] = "raw RGB pixel values 0..255 (normalisation is inside the model)"
        if quant:
            spec["normalization"]["quantize_input"] = "q = round(x / scale + zero_point), clipped to the dtype"
        return spec


# ----------------------------------------------------------------------------- int8 export
def _export_int8(request: ExportRequest, model: nn.Module, example: torch.Tensor, info: dict[str, Any]) -> bytes:
    """The shared PT2E model (re-calibrated on the wrapped model for NHWC / raw-pixel input) through
    litert-torch's QDQ lowering, with the I/O dtype asked for."""
    opts: TfliteOptions = request.options
    quantized = request.quantized
    if quantized is None:
        raise ValueError("int8 export needs the shared PT2E model (request.quantized)")
    _check_fallback_fits(quantized, opts)
    if needs_wrapper(opts):
        quantized = _requantize_wrapped(request, model)
        info["requantized"] = ("PT2E re-run with the same recipe and calibration images on the model wrapped for "
                               "NHWC / raw-pixel input; no PyTorch simulation comparison (it is another model)")
    info["method"] = ("pt2e (shared project quantization) -> litert QDQ lowering: int8 weights per-channel "
                      "symmetric, int8 activations per-tensor")
    return set_io_dtype(_convert_int8(quantized, example), opts.io_dtype)


def _check_fallback_fits(quantized: Any, opts: TfliteOptions) -> None:
    fallback = quantized.calibration.get("fallback") or {}
    if opts.io_dtype != "float" and fallback.get("sites"):
        raise UserError(f"recipe '{quantized.recipe.name}' keeps {len(fallback['sites'])} activations float "
                        f"(quantization.fallback), which a full-integer ({opts.io_dtype} I/O) model cannot "
                        f"hold: use --io-dtype float, or a recipe without a fallback (e.g. ptq-int8)")


def _requantize_wrapped(request: ExportRequest, model: nn.Module) -> Any:
    """The shared PT2E graph takes normalised NCHW; a graph with another input needs its own observers at that
    input, so the same recipe is re-run on the wrapped model with the same calibration images."""
    from ...quantization.pt2e import quantize

    if request.quantized.calibration.get("method") == "qat":
        raise UserError("--layout nhwc / --bake-normalization re-calibrate a wrapped copy of the float "
                        "model, which would discard QAT's training: export QAT models with the default "
                        "NCHW normalised input (--layout nchw, no --bake-normalization)")
    calib = wrapper_calibration(request, request.options)
    return quantize(model, calib, request.quantized.recipe, "same calibration images, wrapped input")


# ----------------------------------------------------------------------------- options and wrapping
def check_options(opts: TfliteOptions, precision: str) -> None:
    """Reject option combinations that cannot be built, with the fix."""
    if opts.io_dtype != "float" and precision != "int8":
        raise UserError(f"--io-dtype {opts.io_dtype} makes a full-integer model and needs --int8; "
                        f"use --io-dtype float for {precision}")


def needs_wrapper(opts: TfliteOptions) -> bool:
    return opts.layout == "nhwc" or opts.bake_normalization


def example_shape(input_size: tuple[int, int], opts: TfliteOptions) -> tuple[int, int, int, int]:
    h, w = input_size
    return (1, h, w, 3) if opts.layout == "nhwc" else (1, 3, h, w)


def deploy_module(model: nn.Module, pre: Any, opts: TfliteOptions) -> nn.Module:
    """`model` with the artifact's input convention (NHWC and/or raw 0..255 pixels), or `model` itself."""
    if not needs_wrapper(opts):
        return model
    return DeployInput(model, pre, nhwc=opts.layout == "nhwc", raw_pixels=opts.bake_normalization).eval()


def to_artifact_input(x: np.ndarray, pre: Any, opts: TfliteOptions) -> np.ndarray:
    """Normalised NCHW float32 -> what the artifact's graph takes (before integer quantization)."""
    if opts.bake_normalization:
        mean = np.asarray(pre.mean, np.float32)[:, None, None]
        std = np.asarray(pre.std, np.float32)[:, None, None]
        # The images came from uint8 pixels: rounding recovers them exactly.
        x = np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.float32)
    if opts.layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def wrapper_calibration(request: ExportRequest, opts: TfliteOptions) -> Any:
    """The calibration images in the wrapped model's input convention."""
    from ...load.images import LoadedImages

    calib = request.calibration
    if calib is None:
        raise ValueError("int8 with layout nhwc or baked normalisation re-quantizes and needs calibration images")
    x = to_artifact_input(calib.x, request.loaded.preprocessing, opts)
    return LoadedImages(x, None, 0, calib.uint8)


# ----------------------------------------------------------------------------- conversion
def _convert(model: Any, example: Any, quant_config: Any) -> bytes:
    import litert_torch

    with captured("litert_torch.convert", env={"LITERT_TORCH_SHOW_PROGRESS": "n"}):
        edge = litert_torch.convert(model, (example,), quant_config=quant_config)
        return bytes(edge.model_content())


def _convert_int8(quantized: Any, example: Any) -> bytes:
    from litert_torch.quantize.quant_config import QuantConfig

    from torchao.quantization.pt2e import move_exported_model_to_eval

    graph_module = move_exported_model_to_eval(quantized.converted(fold_weights=False))
    graph_module.training = False  # exported models refuse .eval(); litert warns on the flag alone
    softmax_composites(graph_module)
    return _convert(graph_module, example, QuantConfig(pt2e_quantizer=quantized.quantizer))


def float_graph(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """What the float conversions convert: hybrids exported with their softmax marked as the fused SOFTMAX
    builtin (as in the int8 model, so int8/float comparisons are like for like); other models as they are."""
    from ...preparation.mqa import MobileMQA

    if not any(isinstance(m, MobileMQA) for m in model.modules()):
        return model
    gm = torch.export.export(model, (example,)).module()
    gm.training = False  # exported models refuse .eval()
    softmax_composites(gm)
    return gm



# ----------------------------------------------------------------------------- graph inspection
def _interpreter(path: Path, delegates: bool = True, threads: Optional[int] = None) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    return it


def graph(path: Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """The model's operators (as written, before any delegate) and its tensors by index."""
    it = _interpreter(path, delegates=False)
    return it._get_ops_details(), {t["index"]: t for t in it.get_tensor_details()}


def _io(path: Path) -> tuple[list[int], list[int]]:
    it = _interpreter(path, delegates=False)
    return [d["index"] for d in it.get_input_details()], [d["index"] for d in it.get_output_details()]


def _op_tensors(op: dict[str, Any], tensors: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [tensors[int(i)] for i in list(op["inputs"]) + list(op["outputs"]) if int(i) >= 0 and int(i) in tensors]


def _is_float_op(op: dict[str, Any], tensors: dict[int, dict[str, Any]]) -> bool:
    return any(np.dtype(t["dtype"]) in _FLOAT_DTYPES for t in _op_tensors(op, tensors))


def _is_integer_op(op: dict[str, Any], tensors: dict[int, dict[str, Any]]) -> bool:
    """An op whose activations are 8-bit integers (int32 biases and shape operands allowed)."""
    ts = _op_tensors(op, tensors)
    return not _is_float_op(op, tensors) and any(np.dtype(t["dtype"]) in (np.int8, np.uint8) for t in ts)


_COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")


def _int8_compute(ops: list[dict[str, Any]], tensors: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Convolutions and matmuls with 8-bit activations, from the interpreter's own op list (XNNPACK runs each
    delegated op with the types the model gives it)."""
    compute = [op for op in ops if op["op_name"] in _COMPUTE_OPS]
    floating = [op for op in compute if not _is_integer_op(op, tensors)]
    return {"int8": len(compute) - len(floating), "total": len(compute),
            "float": [f"#{op['index']} ({op['op_name']})" for op in floating],
            "source": "ai_edge_litert Interpreter op list"}


def float_ops(path: Path) -> collections.Counter:
    """Operators that compute in (or convert to/from) float: what a full-integer model must not have."""
    ops, tensors = graph(path)
    return collections.Counter(op["op_name"] for op in ops if _is_float_op(op, tensors))


def op_macs(op: dict[str, Any], tensors: dict[int, dict[str, Any]]) -> int:
    """Multiply-accumulates of one op, from its output and weight shapes (0 for ops without MACs)."""
    name = op["op_name"]
    ins = [int(i) for i in op["inputs"] if int(i) >= 0]
    if not ins or not len(op["outputs"]):
        return 0
    out = math.prod(int(d) for d in tensors[int(op["outputs"][0])]["shape"])
    shape = lambda i: [int(d) for d in tensors[ins[i]]["shape"]] if len(ins) > i else []
    if name == "CONV_2D" and len(shape(1)) == 4:  # filter [O, kh, kw, I/groups]
        return out * math.prod(shape(1)[1:])
    if name == "DEPTHWISE_CONV_2D" and len(shape(1)) == 4:  # filter [1, kh, kw, O]
        return out * shape(1)[1] * shape(1)[2]
    if name == "FULLY_CONNECTED" and len(shape(1)) == 2:  # weights [O, I]
        return out * shape(1)[1]
    if name == "BATCH_MATMUL" and shape(0):
        return out * shape(0)[-1]
    return 0


def _tensor_spec(t: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": t["name"], "shape": [int(d) for d in t["shape"]],
                            "dtype": np.dtype(t["dtype"]).name}
    if np.issubdtype(t["dtype"], np.integer):
        scale, zero = t["quantization"]
        spec["scale"], spec["zero_point"] = float(scale), int(zero)
    return spec


# ----------------------------------------------------------------------------- runner
class TfliteRunner(Runner):
    """The artifact in ai_edge_litert's Interpreter (XNNPACK, fixed threads), one image per invoke."""

    def __init__(self, path: Path, pre: Any, opts: TfliteOptions) -> None:
        self.pre, self.opts = pre, opts
        self.threads = opts.threads or "LiteRT default"
        self.interpreter = _interpreter(path, delegates=True, threads=opts.threads or None)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        if int(self.input["shape"][0]) != 1:
            raise ValueError(f"expected a batch-1 model, got input shape {list(self.input['shape'])}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xin = artifact_input(np.asarray(x, np.float32), self.pre, self.opts, self.input)
        y, _ = invoke_each(self.interpreter, xin)
        return float_output(y, self.output).astype(np.float32)


def artifact_input(x: np.ndarray, pre: Any, opts: TfliteOptions, detail: dict[str, Any]) -> np.ndarray:
    """Normalised NCHW float32 -> the artifact's input tensor (layout, raw pixels, integer quantization with
    the model's own scale and zero point)."""
    x = to_artifact_input(x, pre, opts)
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.integer):
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x / scale + zero), info.min, info.max).astype(dtype)
    return x


def invoke_each(interpreter: Any, x: np.ndarray, keep: Sequence[int] = ()) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Run a batch-1 interpreter image by image: the raw output, and the tensors `keep` names, batch first."""
    i_in = interpreter.get_input_details()[0]["index"]
    i_out = interpreter.get_output_details()[0]["index"]
    outs, kept = [], {t: [] for t in keep}
    for k in range(len(x)):
        interpreter.set_tensor(i_in, x[k:k + 1])
        interpreter.invoke()
        outs.append(interpreter.get_tensor(i_out).copy())
        for t in keep:
            kept[t].append(interpreter.get_tensor(t).copy())
    return np.concatenate(outs), {t: _batch_first(v) for t, v in kept.items()}


def _batch_first(per_image: list[np.ndarray]) -> np.ndarray:
    """Per-image tensors stacked on a new batch axis, which replaces a leading batch-1 axis. A tensor the converter
    reshaped without one (an attention matrix as a 2-D FULLY_CONNECTED operand) keeps its rows per image."""
    stacked = np.stack(per_image)
    return stacked.reshape(len(per_image), *stacked.shape[2:]) if stacked.ndim > 1 and stacked.shape[1] == 1 \
        else stacked


def float_output(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An integer output dequantized with its own parameters; float outputs as they are."""
    if np.issubdtype(y.dtype, np.integer):
        scale, zero = detail["quantization"]
        return (y.astype(np.float64) - zero) * scale
    return y.astype(np.float64)


# ----------------------------------------------------------------------------- intermediates (tensor-by-tensor)
def runtime_quantized_tensors(path: Path, request: ExportRequest, x: np.ndarray) -> tuple[list[QTensor], dict[str, Any]]:
    """The TFLite interpreter with all tensors preserved: every per-tensor int8/uint8 activation.

    Intermediates are only kept by the built-in kernels (a delegate such as XNNPACK computes its partition
    internally), so this runs without the default delegates; the info says how far its logits are from the
    XNNPACK run that verification and apps use.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    chosen = _quantized_activations(it)
    xin = artifact_input(np.asarray(x, np.float32), request.loaded.preprocessing, request.options, inp)
    logits, kept = invoke_each(it, xin, [t for t, _ in chosen])
    details = {t["index"]: t for t in it.get_tensor_details()}
    out = []
    for i, (t, op) in enumerate(chosen):
        q, dtype = details[t]["quantization_parameters"], np.dtype(details[t]["dtype"])
        out.append(QTensor(details[t]["name"], float(q["scales"][0]), signed_zero_point(int(q["zero_points"][0]), dtype),
                           signed_values(kept[t], dtype), i, op=op))
    info: dict[str, Any] = {"runtime": "ai_edge_litert Interpreter, built-in kernels (experimental_preserve_all_tensors)",
                            "deployed_runtime": "XNNPACK delegate (intermediates not observable there)"}
    try:
        xnn_logits, _ = invoke_each(_interpreter(path, delegates=True), xin)
    except (RuntimeError, ValueError) as exc:
        info["xnnpack_error"] = str(exc).splitlines()[0]
    else:
        a, b = float_output(logits, outp), float_output(xnn_logits, outp)
        info["builtin_vs_xnnpack_logits_max_abs"] = float(np.abs(a - b).max()) if a.size else 0.0
    return out, info


def _quantized_activations(interpreter: Any) -> list[tuple[int, str]]:
    """(tensor index, producing op) of every per-tensor 8-bit activation, the integer input first."""
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    inp = interpreter.get_input_details()[0]
    chosen = [(inp["index"], "input")] if np.dtype(inp["dtype"]) in (np.int8, np.uint8) else []
    for op in interpreter._get_ops_details():
        for t in op["outputs"]:
            d = details.get(int(t))
            if d is not None and np.dtype(d["dtype"]) in (np.int8, np.uint8) \
                    and len(d["quantization_parameters"]["scales"]) == 1:
                chosen.append((int(t), op["op_name"]))
    return chosen
