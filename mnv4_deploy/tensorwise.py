"""Tensor-by-tensor check that a runtime deploys the PyTorch int8 model it was exported from.

Final logits can agree while a layer is wrong (a converter that re-quantizes a tensor with another scale,
or drops a quantize/dequantize pair); this compares every quantized activation instead:

1. PyTorch: the converted PT2E graph (`QuantizedModel.converted()`) runs on a few held-back images and every
   `quantize_per_tensor` output is recorded as int8 with its scale, zero point and PyTorch module path.
2. Runtime: the target exposes its quantized intermediates (`Target.quantized_tensors`): onnxruntime's own
   optimized (QDQ-fused) graph with its 8-bit tensors as graph outputs, the TFLite interpreter (built-in
   kernels) with all tensors preserved, OpenVINO CPU with the FakeQuantize outputs added as model outputs.
3. Matching (converters rename everything): first on quantization parameters (scale to 1e-5 relative, zero
   point) plus element count, trying the layouts the shapes allow (NCHW, NHWC, squeezed); among equal
   candidates the closest values win. Then tensors left on both sides with the same element count are paired
   on dequantized values (relative RMS error < 0.5): such a pair is a tensor the converter re-quantized with
   other parameters. Then a PyTorch quantizer of an identity op the converter folded (flatten after pooling)
   may share an already matched runtime tensor with its parameters and values. Whatever remains is reported
   unmatched: a PyTorch quantizer with no runtime counterpart can mean the converter dropped it.
4. Each matched pair is compared in LSBs of the PyTorch scale, twice: `accumulated` (both sides run freely,
   so differences carry over from earlier layers) and `local` (PyTorch re-runs with every matched tensor's
   dequantized value replaced by the runtime's, so each layer sees the runtime's own inputs and only its own
   error remains). A layer is flagged when its local fraction of elements more than 1 LSB apart exceeds the
   threshold, when its scale/zero point differ from PyTorch's, or when the runtime writes and reads it with
   different parameters: that names the layer a defect starts at rather than everything downstream of it.
   (On faithful exports accumulated differences reach 4-14 LSB with up to 64% of a tensor > 1 LSB off after
   a dozen layers of rounding differences, so only the local numbers can carry a threshold.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

FRACTION_THRESHOLD = 0.01  # flag a layer when more than 1% of its elements are > 1 LSB from PyTorch's
SCALE_RTOL = 1e-5  # float32 scales round-trip through every format to about 1e-7
VALUE_MATCH_RTOL = 0.5  # second matching pass: relative RMS error of dequantized values
IMAGES = 8


@dataclass
class QTensor:
    """One quantized activation on a batch of images: integer values with their scale and zero point."""

    name: str
    scale: float
    zero_point: int
    values: np.ndarray  # integers (int32), batch first, in the producer's own layout
    order: int  # position in its graph's execution order
    module: str = ""  # PyTorch module path (PyTorch side)
    op: str = ""  # the producing operation
    note: str = ""  # a runtime-side inconsistency (e.g. written and read with different scales)

    @property
    def per_image(self) -> int:
        return int(np.prod(self.values.shape[1:]))

    def dequantized(self) -> np.ndarray:
        return (self.values.astype(np.float64) - self.zero_point) * self.scale


@dataclass
class Pair:
    torch: QTensor
    runtime: QTensor
    aligned: np.ndarray  # runtime values dequantized, in the PyTorch tensor's shape
    how: str  # 'qparams' or 'values (re-quantized)'
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- PyTorch side
def _quant_targets() -> tuple[Any, ...]:
    import torch

    ops = torch.ops.quantized_decomposed
    return (ops.quantize_per_tensor.default, ops.quantize_per_tensor.tensor)


def _module_of(node: Any) -> str:
    """The PyTorch module path a quantizer belongs to (its producer's innermost nn_module_stack entry)."""
    import torch

    src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if src is not None and src.op == "placeholder":
        return "input"
    stack = (src.meta.get("nn_module_stack") if src is not None else None) or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


def torch_quantized(gm: Any, x: np.ndarray, forced: Optional[dict[str, np.ndarray]] = None) -> list[QTensor]:
    """Every activation quantizer of a converted PT2E graph run on `x` (int8 outputs, scale, zero point).

    `forced` maps quantizer names to dequantized values (float, PyTorch layout) that their dequantize nodes
    return instead of the computed ones, so later layers run on exactly those inputs (the `local` comparison).
    """
    import torch

    targets = _quant_targets()
    ops = torch.ops.quantized_decomposed
    dequantize = (ops.dequantize_per_tensor.default, ops.dequantize_per_tensor.tensor)
    found: list[QTensor] = []

    class Capture(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and n.target in targets:
                args, _ = self.fetch_args_kwargs_from_env(n)
                scale, zero = float(args[1]), int(args[2])
                found.append(QTensor(n.name, scale, zero, out.numpy().astype(np.int32), len(found),
                                     _module_of(n), str(getattr(n.args[0], "name", ""))))
            elif forced and n.op == "call_function" and n.target in dequantize \
                    and getattr(n.args[0], "name", None) in forced:
                out = torch.from_numpy(forced[n.args[0].name]).to(out.dtype)
            return out

    with torch.no_grad():
        Capture(gm).run(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    return found


# ----------------------------------------------------------------------------- runtimes
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


def onnx_quantized(path: Any, x: np.ndarray) -> tuple[list[QTensor], dict[str, Any]]:
    """onnxruntime CPU, with every 8-bit activation of its *optimized* graph exposed as a graph output.

    Exposing QuantizeLinear outputs of the artifact itself would change what onnxruntime runs: it stops
    fusing DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv when the output is a graph output.
    So the graph onnxruntime makes of the artifact (QDQ fusion, int8 -> uint8 activations, layout) is saved
    first, and that graph runs with its 8-bit tensors exposed and no further optimization: the values are
    those of the fused integer kernels (its logits are checked against the deployed session's). Each tensor takes the scale/zero point its consumers read it with (a
    DequantizeLinear), else its producer's output parameters; layout ops pass their input's on.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    feed_x = np.ascontiguousarray(x, np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    plain_session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {plain_session.get_inputs()[0].name: feed_x}
    plain = plain_session.run(None, feed)[0]
    with tempfile.TemporaryDirectory() as tmp:
        opt = ort.SessionOptions()
        opt.log_severity_level = 3
        # The default level (ALL, as the runner and apps use): the exposed run then reproduces the deployed
        # session's logits bit for bit (EXTENDED differed by one output LSB).
        opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opt.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opt, providers=["CPUExecutionProvider"])
        model = onnx.load(opt.optimized_model_filepath)
    g = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def qparams(names: Sequence[str], k: tuple[int, int]) -> Optional[tuple[float, np.ndarray]]:
        if len(names) <= k[1] or names[k[0]] not in consts or names[k[1]] not in consts:
            return None
        scale, zero = consts[names[k[0]]], consts[names[k[1]]]
        if scale.size != 1 or zero.size != 1 or zero.dtype not in (np.int8, np.uint8, np.int16):
            return None
        return float(scale.reshape(())), zero.reshape(())

    read_as: dict[str, list[tuple[float, np.ndarray, str]]] = {}
    for n in g.node:
        for i, k_scale, k_zero in _ORT_INPUT_QPARAMS.get(n.op_type, ()):
            if len(n.input) > k_zero and n.input[i] not in consts:
                found = qparams(list(n.input), (k_scale, k_zero))
                if found is not None:
                    read_as.setdefault(n.input[i], []).append((*found, n.op_type))
    tensors: dict[str, tuple[float, np.ndarray, str]] = {}  # name -> scale, zero point, producing op
    notes: dict[str, str] = {}
    for n in g.node:
        if not n.output or n.output[0] in consts:
            continue
        if n.op_type in _ORT_OUTPUT_QPARAMS:
            found = qparams(list(n.input), _ORT_OUTPUT_QPARAMS[n.op_type])
        elif n.op_type in _ORT_LAYOUT_OPS and n.input and n.input[0] in tensors:
            found = tensors[n.input[0]][:2]
        else:
            found = None
        readers = read_as.get(n.output[0], [])
        note = ""
        for r in readers:  # the runtime itself disagrees: written with one scale, read with another
            if found is not None and not _close_qparams(found[0], int(found[1]), r[0], int(r[1])):
                note = (f"written with scale {found[0]:.6g} zero point {int(found[1])} by {n.op_type} but read "
                        f"with scale {r[0]:.6g} zero point {int(r[1])} by {r[2]}")
        if readers:  # consumers decide what the values mean
            found = readers[0][:2]
        if found is not None:
            tensors[n.output[0]] = (found[0], found[1], n.op_type)
            if note:
                notes[n.output[0]] = note
    outputs = [o.name for o in g.output]
    for name, (_, zero, _) in tensors.items():
        if name not in outputs:
            elem = onnx.helper.np_dtype_to_tensor_dtype(zero.dtype)
            g.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    run = ort.SessionOptions()
    run.log_severity_level = 3
    run.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), run, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: feed_x})))
    out = [QTensor(name, scale, _signed_zero(int(zero), zero.dtype), _signed(values[name], zero.dtype), i, op=op,
                   note=notes.get(name, "")) for i, (name, (scale, zero, op)) in enumerate(tensors.items())]
    fused = sum(1 for n in g.node if n.op_type.startswith("QLinear") or n.op_type == "QGemm")
    info = {"runtime": "onnxruntime CPUExecutionProvider: its optimized (QDQ-fused) graph, 8-bit tensors exposed",
            "runtime_integer_ops": fused,
            "runtime_float_ops_between_dq_q": sum(1 for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul", "Add")),
            "exposed_run_vs_deployed_logits_max_abs": float(np.abs(values[outputs[0]] - plain).max())}
    return out, info


def _signed(values: np.ndarray, dtype: Any) -> np.ndarray:
    """Integer values as int32 on the int8 grid (uint8 tensors are shifted by -128, with their zero point)."""
    v = np.asarray(values).astype(np.int32)
    return v - 128 if np.dtype(dtype) == np.uint8 else v


def _signed_zero(zero: int, dtype: Any) -> int:
    return int(zero) - 128 if np.dtype(dtype) == np.uint8 else int(zero)


def tflite_quantized(path: Any, x_artifact: np.ndarray) -> tuple[list[QTensor], dict[str, Any]]:
    """The TFLite interpreter with all tensors preserved: every per-tensor int8/uint8 activation.

    `x_artifact` is already in the artifact's input layout (float; integer inputs are quantized here with the
    model's own parameters). Intermediates are only kept by the built-in kernels (a delegate such as XNNPACK
    computes its partition internally), so this runs without the default delegates; the info says how far
    its logits are from the XNNPACK run.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kinds = {"plain": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, "xnnpack": OpResolverType.AUTO}
    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=kinds["plain"])
    it.allocate_tensors()
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    chosen: list[tuple[int, str]] = []  # (tensor index, producing op)
    if np.dtype(inp["dtype"]) in (np.int8, np.uint8):
        chosen.append((inp["index"], "input"))
    for op in ops:
        for t in op["outputs"]:
            d = details.get(int(t))
            if d is None or np.dtype(d["dtype"]) not in (np.int8, np.uint8):
                continue
            scales = d["quantization_parameters"]["scales"]
            if len(scales) == 1:
                chosen.append((int(t), op["op_name"]))
    in_dtype = np.dtype(inp["dtype"])
    if np.issubdtype(in_dtype, np.integer):
        scale, zero = inp["quantization"]
        info_i = np.iinfo(in_dtype)
        x_artifact = np.clip(np.rint(x_artifact / scale + zero), info_i.min, info_i.max).astype(in_dtype)
    per_image: dict[int, list[np.ndarray]] = {t: [] for t, _ in chosen}
    logits = []
    for k in range(len(x_artifact)):
        it.set_tensor(inp["index"], x_artifact[k:k + 1])
        it.invoke()
        for t, _ in chosen:
            per_image[t].append(it.get_tensor(t).copy())
        logits.append(it.get_tensor(outp["index"]).copy())
    xnn_logits: list[np.ndarray] = []
    xnn_error = None
    try:
        xnn = Interpreter(model_path=str(path), experimental_op_resolver_type=kinds["xnnpack"])
        xnn.allocate_tensors()
        for k in range(len(x_artifact)):
            xnn.set_tensor(xnn.get_input_details()[0]["index"], x_artifact[k:k + 1])
            xnn.invoke()
            xnn_logits.append(xnn.get_tensor(xnn.get_output_details()[0]["index"]).copy())
    except (RuntimeError, ValueError) as exc:
        xnn_error = str(exc).splitlines()[0]
    out = []
    for i, (t, op) in enumerate(chosen):
        d = details[t]
        q = d["quantization_parameters"]
        dtype = np.dtype(d["dtype"])
        out.append(QTensor(d["name"], float(q["scales"][0]), _signed_zero(int(q["zero_points"][0]), dtype),
                           _signed(np.concatenate(per_image[t]), dtype), i, op=op))
    info: dict[str, Any] = {"runtime": "ai_edge_litert Interpreter, built-in kernels (experimental_preserve_all_tensors)",
                            "deployed_runtime": "XNNPACK delegate (intermediates not observable there)"}
    if xnn_error is None:
        a, b = _float_output(np.concatenate(logits), outp), _float_output(np.concatenate(xnn_logits), outp)
        info["builtin_vs_xnnpack_logits_max_abs"] = float(np.abs(a - b).max()) if a.size else 0.0
    else:
        info["xnnpack_error"] = xnn_error
    return out, info


def _float_output(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        scale, zero = detail["quantization"]
        return (y.astype(np.float64) - zero) * scale
    return y.astype(np.float64)


def openvino_quantized(path: Any, x: np.ndarray, config: dict[str, Any]) -> tuple[list[QTensor], dict[str, Any]]:
    """OpenVINO CPU with every activation FakeQuantize output added as a model output.

    A FakeQuantize output is the dequantized float; its integer value is recovered with the node's own
    scale and zero point (levels and output range). Constant-fed FakeQuantize nodes (weights) are skipped.
    """
    import openvino as ov

    from .targets.openvino import XML

    core = ov.Core()
    model = core.read_model(str(path / XML) if (path / XML).exists() else str(path))
    fqs = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        src = op.input_value(0).get_node()
        while src.get_type_name() in ("Convert", "Reshape", "Unsqueeze"):
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant":
            continue
        lo, hi = (op.input_value(k).get_node() for k in (3, 4))
        if lo.get_type_name() != "Constant" or hi.get_type_name() != "Constant":
            continue
        low, high = lo.get_data().astype(np.float64), hi.get_data().astype(np.float64)
        if low.size != 1:
            continue
        levels = int(op.get_attributes()["levels"])
        scale = float((high.reshape(()) - low.reshape(())) / (levels - 1))
        qmin = -(levels // 2)
        zero = int(round(qmin - float(low.reshape(())) / scale))
        fqs.append((op, scale, zero, qmin, levels))
    # An output already produced by the model (the logits' FakeQuantize) is not added twice: look up by name.
    names = []
    for op, *_ in fqs:
        if not op.output(0).get_names():
            op.output(0).get_tensor().set_names({op.get_friendly_name() + ":fq"})
        names.append(op.output(0).get_any_name())
    model.add_outputs([op.output(0) for op, *_ in fqs])
    compiled = core.compile_model(model, "CPU", config)
    res = compiled.infer_new_request({0: np.ascontiguousarray(x, np.float32)})
    plain = core.compile_model(core.read_model(str(path / XML)), "CPU", config).infer_new_request(
        {0: np.ascontiguousarray(x, np.float32)})
    logits, plain_logits = res[compiled.outputs[0]], plain[0]
    out = []
    for i, (op, scale, zero, qmin, levels) in enumerate(fqs):
        y = np.asarray(res[compiled.output(names[i])], np.float64)
        q = np.clip(np.rint(y / scale) + zero, qmin, qmin + levels - 1).astype(np.int32)
        out.append(QTensor(op.get_friendly_name(), scale, zero, q, i, op="FakeQuantize"))
    info = {"runtime": f"OpenVINO CPU {config.get('INFERENCE_PRECISION_HINT', 'auto')} (FakeQuantize outputs exposed)",
            "exposing_changed_logits_max_abs": float(np.abs(np.asarray(logits) - np.asarray(plain_logits)).max())}
    return out, info


# ----------------------------------------------------------------------------- matching
def _alignments(values: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """`values` (runtime layout, batch first) rearranged to PyTorch's `shape`, every way the shapes allow."""
    out = []
    if values.shape == shape:
        out.append(values)
    if values.ndim == 4 and len(shape) == 4 and values.transpose(0, 3, 1, 2).shape == shape:
        out.append(values.transpose(0, 3, 1, 2))
    squeeze = lambda s: tuple(d for d in s if d != 1)
    if not out and values.size == int(np.prod(shape)) and squeeze(values.shape[1:]) == squeeze(shape[1:]) \
            and values.shape[0] == shape[0]:
        out.append(values.reshape(shape))
    return out


def _close_qparams(scale_a: float, zero_a: int, scale_b: float, zero_b: int) -> bool:
    return zero_a == zero_b and abs(scale_a - scale_b) <= SCALE_RTOL * max(scale_a, scale_b)


def _same_qparams(a: QTensor, b: QTensor) -> bool:
    return _close_qparams(a.scale, a.zero_point, b.scale, b.zero_point)


def _best(t: QTensor, candidates: Sequence[QTensor]) -> Optional[tuple[QTensor, np.ndarray, float]]:
    """The candidate whose dequantized values (best layout) are closest to `t`'s: (tensor, aligned, rel. RMS)."""
    ref = t.dequantized()
    norm = float(np.sqrt(np.mean(ref ** 2))) or t.scale
    best = None
    for c in candidates:
        deq = c.dequantized()
        for aligned in _alignments(deq, ref.shape):
            err = float(np.sqrt(np.mean((aligned - ref) ** 2))) / norm
            if best is None or err < best[2]:
                best = (c, aligned, err)
    return best


def match(torch_tensors: Sequence[QTensor], runtime: Sequence[QTensor]) -> tuple[list[Pair], list[QTensor], list[QTensor]]:
    left = list(runtime)
    pairs: list[Pair] = []
    unmatched: list[QTensor] = []
    for t in torch_tensors:
        cands = [r for r in left if _same_qparams(t, r) and r.values.size == t.values.size]
        best = _best(t, cands) if cands else None
        if best is None:
            unmatched.append(t)
            continue
        left.remove(best[0])
        pairs.append(Pair(t, best[0], best[1], "qparams"))
    still: list[QTensor] = []
    for t in unmatched:  # re-quantized tensors: same size, close values, other scale or zero point
        cands = [r for r in left if r.values.size == t.values.size]
        best = _best(t, cands) if cands else None
        if best is None or best[2] > VALUE_MATCH_RTOL:
            still.append(t)
            continue
        left.remove(best[0])
        pairs.append(Pair(t, best[0], best[1], "values (re-quantized)"))
    lost: list[QTensor] = []
    for t in still:  # an identity op the converter folded (flatten after pooling): shares a matched tensor
        cands = [p.runtime for p in pairs if _same_qparams(t, p.runtime) and p.runtime.values.size == t.values.size]
        best = _best(t, cands) if cands else None
        if best is None or best[2] > VALUE_MATCH_RTOL:
            lost.append(t)
            continue
        pairs.append(Pair(t, best[0], best[1], "qparams (shares a runtime tensor: identity op folded)"))
    pairs.sort(key=lambda p: p.torch.order)
    return pairs, lost, left


def _lsb_stats(reference: QTensor, aligned: np.ndarray, observed: Optional[np.ndarray] = None) -> dict[str, Any]:
    ref = reference.dequantized() if observed is None else observed
    lsb = np.abs(aligned - ref) / reference.scale
    return {"max_lsb": round(float(lsb.max()), 3), "mean_lsb": round(float(lsb.mean()), 5),
            "frac_over_1lsb": round(float((lsb > 1.0 + 1e-6).mean()), 6)}


# ----------------------------------------------------------------------------- the check
def compare(gm: Any, x: np.ndarray, runtime: Sequence[QTensor], threshold: float = FRACTION_THRESHOLD) -> dict[str, Any]:
    """Match `runtime` to the PyTorch quantizers of `gm` on `x`, compare each pair; summary + full table."""
    free = torch_quantized(gm, x)
    pairs, lost, extra = match(free, runtime)
    # Local comparison: PyTorch again, each matched quantizer's dequantized output replaced by the runtime's
    # (exact, whatever grid the runtime used), so every layer is judged on the runtime's own inputs.
    forced = {p.torch.name: p.aligned.astype(np.float32) for p in pairs}
    local = {t.name: t for t in torch_quantized(gm, x, forced)}
    rows = []
    for p in pairs:
        acc = _lsb_stats(p.torch, p.aligned)
        loc = _lsb_stats(local[p.torch.name], p.aligned)
        reasons = []
        if not _same_qparams(p.torch, p.runtime):
            reasons.append(f"re-quantized: scale {p.runtime.scale:.6g} zero point {p.runtime.zero_point} "
                           f"(PyTorch {p.torch.scale:.6g}, {p.torch.zero_point})")
        if p.runtime.note:
            reasons.append(f"inconsistent in the runtime: {p.runtime.note}")
        if loc["frac_over_1lsb"] > threshold:
            reasons.append(f"{100 * loc['frac_over_1lsb']:.1f}% of elements > 1 LSB from PyTorch on the same inputs")
        rows.append({"order": p.torch.order, "quantizer": p.torch.name, "module": p.torch.module,
                     "producer": p.torch.op, "runtime_tensor": p.runtime.name, "runtime_op": p.runtime.op,
                     "shape": list(p.torch.values.shape[1:]), "scale": p.torch.scale,
                     "zero_point": p.torch.zero_point, "runtime_scale": p.runtime.scale,
                     "runtime_zero_point": p.runtime.zero_point, "matched_on": p.how,
                     "local": loc, "accumulated": acc, "flagged": bool(reasons), "reasons": reasons})
    matched_qparams = [p.runtime for p in pairs]
    extra_new = [r for r in extra if not any(_same_qparams(r, m) for m in matched_qparams)]
    flagged = [r for r in rows if r["flagged"]]
    brief = lambda r: {"quantizer": r["quantizer"], "module": r["module"], "runtime_tensor": r["runtime_tensor"],
                       "local_max_lsb": r["local"]["max_lsb"], "local_frac_over_1lsb": r["local"]["frac_over_1lsb"],
                       "accumulated_max_lsb": r["accumulated"]["max_lsb"], "reasons": r["reasons"]}
    worst = sorted(rows, key=lambda r: (r["local"]["frac_over_1lsb"], r["local"]["max_lsb"]), reverse=True)[:3]
    summary = {
        "status": "compared",
        "images": int(len(x)),
        "pytorch_quantizers": len(free),
        "runtime_quantized_tensors": len(runtime),
        "matched": len(pairs),
        "matched_by_values_requantized": sum(1 for p in pairs if p.how.startswith("values")),
        "matched_to_shared_tensor": sum(1 for p in pairs if "shares" in p.how),
        "unmatched_pytorch": [{"quantizer": t.name, "module": t.module, "producer": t.op,
                               "scale": t.scale, "zero_point": t.zero_point} for t in lost],
        "unmatched_runtime": len(extra),
        "unmatched_runtime_new_qparams": [{"tensor": r.name, "op": r.op, "scale": r.scale,
                                           "zero_point": r.zero_point} for r in extra_new][:10],
        "flag_rule": f"local fraction of elements > 1 LSB above {threshold:.0%}, or scale/zero point differ",
        "flagged": len(flagged),
        "first_flagged": brief(flagged[0]) if flagged else None,
        "flagged_layers": [brief(r) for r in flagged][:10],
        "worst": [brief(r) for r in worst],
        "max_local_lsb": max((r["local"]["max_lsb"] for r in rows), default=None),
        "max_accumulated_lsb": max((r["accumulated"]["max_lsb"] for r in rows), default=None),
    }
    return {"summary": summary, "table": rows}


def check(target: Any, path: Any, request: Any, x: np.ndarray) -> dict[str, Any]:
    """The tensor-by-tensor comparison of one artifact: {'summary': ..., 'table': [...]} (table may be absent)."""
    if request.precision != "int8" or request.quantized is None:
        return {"summary": {"status": "not applicable: not an int8 artifact of the shared PT2E model"}}
    method = getattr(target, "quantized_tensors", None)
    got = method(path, request, x) if method is not None else None
    if got is None:
        return {"summary": {"status": f"not available: {target.name} does not expose intermediates"}}
    if isinstance(got, str):
        return {"summary": {"status": got}}
    runtime, info = got
    q = request.quantized
    gm = q._sim_module() if hasattr(q, "_sim_module") else q.converted(fold_weights=True)
    result = compare(gm, x, runtime)
    result["summary"] = {"status": "compared", **info, **{k: v for k, v in result["summary"].items() if k != "status"}}
    return result


def warning_line(target: str, summary: dict[str, Any]) -> Optional[str]:
    """One line naming the flagged (and dropped) layers, or None when everything matched."""
    if summary.get("status") != "compared":
        return None
    lost = summary.get("unmatched_pytorch") or []
    names = [f"{r['module'] or r['quantizer']} ({r['quantizer']})" for r in summary.get("flagged_layers", [])]
    if not names and not lost:
        return None
    parts = []
    if names:
        parts.append(f"{summary['flagged']} layer(s) disagree with the PyTorch simulation, first "
                     f"{names[0]}; flagged: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if lost:
        parts.append(f"{len(lost)} PyTorch quantizer(s) without a runtime counterpart (dropped?): "
                     + ", ".join(f"{t['module'] or t['quantizer']} ({t['quantizer']})" for t in lost[:5]))
    return f"warning: [{target}] tensor-by-tensor: " + "; ".join(parts)


def summary_line(target: str, summary: dict[str, Any]) -> str:
    """One line for the CLI: matched / unmatched / flagged, or why the check did not run."""
    if summary.get("status") != "compared":
        return f"{target}: {summary.get('status')}"
    first = summary.get("first_flagged")
    where = f", first {first['module'] or first['quantizer']}" if first else ""
    return (f"{target}: {summary['matched']}/{summary['pytorch_quantizers']} quantizers matched, "
            f"{len(summary['unmatched_pytorch'])} missing in the runtime, {summary['flagged']} flagged{where} "
            f"(max local {summary['max_local_lsb']} LSB, accumulated {summary['max_accumulated_lsb']} LSB)")
