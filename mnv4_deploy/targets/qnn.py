"""QNN target: Qualcomm's Hexagon NPU (HTP) through onnxruntime-qnn.

The artifact is a folder an app ships: the QDQ ONNX model made for the HTP backend (static shapes, uint8 or
uint16 activations, int8 per-channel conv weights) and the compiled context binary (`EPContext` model plus its
`.bin`) for one Snapdragon SoC, which is what an app loads on the device. On x86 the HTP backend
(`libQnnHtp.so`) emulates the NPU: numbers are "emulated", never timed. Placement is proven, not assumed: the
context binary is compiled and verified with CPU fallback disabled, and QNN's own framework op trace (which
node went where, and why a node was refused) is kept beside it and summarised in the manifest.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import VerificationError
from ..options import choice, option
from ..semantics import EXACT, Semantics
from ..tensorwise import QTensor
from .base import ExportRequest, Runner, RuntimeTensors, Target
from .onnx import INPUT_NAME, INT16_OPSET, OnnxTarget, _export, activations_to_uint8, activations_to_unsigned

logger = logging.getLogger(__name__)

QDQ_MODEL, CONTEXT_MODEL, TRACE = "model.qdq.onnx", "model_ctx.onnx", "qnn_op_trace.json"
# Snapdragon SoCs QNN can compile for: QNN's soc_model number, HTP architecture, marketing name.
SOCS: dict[str, tuple[int, int, str]] = {
    "SM8350": (30, 68, "Snapdragon 888"),
    "SM8450": (36, 69, "Snapdragon 8 Gen 1"),
    "SM8550": (43, 73, "Snapdragon 8 Gen 2"),
    "SM8650": (57, 75, "Snapdragon 8 Gen 3"),
    "SM8750": (69, 79, "Snapdragon 8 Elite"),
}
MODELLED_HTP_ARCH = 73  # mnv4_deploy/htp_semantics.py's rule holds bit for bit from HTP v73 on (measured)
_FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"  # onnxruntime's words when placement fails
_COMPUTE = ("Conv", "Gemm", "MatMul")
_QNN_COMPUTE = ("Conv2d", "DepthWiseConv2d", "TransposeConv2d", "FullyConnected", "MatMul")


@dataclass(frozen=True)
class QnnOptions:
    # Default SM8550 (Snapdragon 8 Gen 2, HTP v73): the most common HTP generation in current phones and
    # Qualcomm AI Hub's default device; the context binary runs on this architecture or newer.
    soc: str = choice("SM8550", *SOCS, flag=(
        "qnn: Snapdragon SoC the context binary is compiled for: " + ", ".join(
            f"{k} ({v[2]}, HTP v{v[1]})" for k, v in SOCS.items()) + "; default SM8550"))
    allow_cpu_fallback: bool = option(False, flag=(
        "qnn: write the model even if QNN leaves nodes off the NPU (they run on the CPU; the manifest names each "
        "with QNN's reason); default: refuse a model not placed whole on HTP"))
    # The HTP emulator is slow (seconds per image for a hybrid; README has the measured times), so verification
    # runs on at most this many images of each evaluation set, evenly spaced (0 = all); the manifest says so.
    emulated_images: int = option(64, low=0, high=1_000_000, flag=(
        "qnn: verify on at most N images of each evaluation set, evenly spaced (the HTP emulator takes seconds "
        "per image; 0 = all); default 64"))


class QnnTarget(Target):
    name = "qnn"
    title = "Qualcomm QNN (Hexagon NPU)"
    extra = "qnn"
    artifact_name = "model"  # a folder: QDQ model, context model + binary, QNN's op trace
    precisions = ("int8",)
    requires = ("onnx", "onnxruntime", "onnxscript", "onnxruntime_qnn")
    Options = QnnOptions
    int16_activations = True  # an int16 fallback's sites run as uint16 activations (w8a16) on HTP

    def distributions(self) -> tuple[str, ...]:
        return ("onnxruntime-qnn", "onnxruntime", "onnx", "onnxscript")

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        opts: QnnOptions = request.options
        path.mkdir()
        qdq = path / QDQ_MODEL
        opset = INT16_OPSET if request.quantized.int16_sites else OnnxTarget.Options().opset
        _export(request.quantized.converted(fold_weights=True), request.example, qdq, opset)
        to_uint8 = activations_to_uint8(qdq)
        to_uint16 = _int16_to_uint16(qdq)
        converts = _convert_boundaries(qdq) if to_uint16 else 0
        _fix_batch(qdq, request.loaded.preprocessing.input_size)
        soc_model, arch, soc_name = SOCS[opts.soc]
        _compile_context(qdq, path / CONTEXT_MODEL, path, opts)
        binary = [p.name for p in path.glob("*.bin")]
        method = ("pt2e -> QDQ for QNN HTP (int8 weights per-channel symmetric, uint8 activations per-tensor"
                  + (f", uint16 activations at {len(request.quantized.int16_sites)} int16 fallback sites"
                     if request.quantized.int16_sites else "") + f") -> context binary for {opts.soc}")
        return {"method": method, "opset": opset, "soc": opts.soc, "soc_name": soc_name, "soc_model": soc_model,
                "htp_arch": f"v{arch}", "static_shape": [1, 3, *request.loaded.preprocessing.input_size],
                "activation_zero_points_rewritten": {"int8->uint8": to_uint8, "int16->uint16": to_uint16},
                "uint8_uint16_converts": converts,
                "qdq_model": QDQ_MODEL, "context_model": CONTEXT_MODEL, "context_binary": binary,
                "context_binary_bytes": sum((path / b).stat().st_size for b in binary),
                "cpu_fallback": "allowed (--allow-cpu-fallback)" if opts.allow_cpu_fallback else "disabled",
                "qnn_sdk": _qnn_sdk_version()}

    def load(self, path: Path, request: ExportRequest) -> Runner:
        opts: QnnOptions = request.options
        runner = QnnRunner(path / CONTEXT_MODEL, opts)
        started = time.perf_counter()
        runner(np.zeros((1, 3, *request.loaded.preprocessing.input_size), np.float32))
        seconds = time.perf_counter() - started
        runner.max_images = opts.emulated_images or None
        runner.max_images_reason = (f"the HTP emulator took {seconds:.2f} s per image on this host; "
                                    "--emulated-images sets how many")
        if opts.emulated_images:
            logger.info(f"[qnn] HTP emulation: {seconds:.2f} s per image here; verifying on at most "
                        f"{opts.emulated_images} images per evaluation set (--emulated-images)")
        return runner

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        import onnx

        model = onnx.load(str(path / QDQ_MODEL))
        trace = json.loads((path / TRACE).read_text())
        placement = placement_record(model, trace)
        ops = collections.Counter(n.op_type for n in model.graph.node)
        context = collections.Counter(n.op_type for n in onnx.load(str(path / CONTEXT_MODEL)).graph.node)
        return {
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "context_model_operators": dict(context),
            "htp_quantization": htp_quantization(model),
            "placement": placement,
            "int8_compute": _compute_record(model, placement),
        }

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        return emulated_quantized_tensors(path, request.options, x)

    def simulation_semantics(self, request: ExportRequest) -> Semantics:
        """HTP's own requantization (mnv4_deploy/htp_semantics.py), with the conv biases and Add tables HTP
        compiles for this SoC probed from the emulator. The rule was measured on HTP v73 and later (SM8550,
        SM8650, SM8750, bit for bit); v68/v69 round otherwise, and are compared with the exact simulation."""
        from ..htp_semantics import htp_graph
        soc = request.options.soc
        if SOCS[soc][1] < MODELLED_HTP_ARCH:
            return EXACT
        return Semantics(f"htp-{soc}", f"Qualcomm HTP ({soc}): conv/linear requantization by shift and 12-bit "
                         "multiplier rounding half up, global pool rounding half up, conv biases and 8-bit Adds as "
                         "the emulator compiles them (probed on synthetic inputs), strided depthwise convs with the "
                         "zero point folded in and a Q15 multiplier; 16-bit activations and other ops exact "
                         "(mnv4_deploy/htp_semantics.py)",
                         functools.partial(htp_graph, probes=EmulatorProbes(soc)))


# ----------------------------------------------------------------------------- export helpers
def _int16_to_uint16(path: Path) -> int:
    """int16 activation zero points as uint16 (+32768, same scale): the same real values in the 16-bit type
    QNN's HTP runs (it documents uint8/uint16 activations). Returns how many zero points changed."""
    return activations_to_unsigned(path, np.int16)


_PASS_THROUGH = ("Relu", "Clip")  # fused between a compute op and its output QuantizeLinear


def _convert_boundaries(path: Path) -> int:
    """QNN's mixed-precision convention: every node unit (DQ inputs -> op -> Q output) runs in one activation
    type, and regions meet through a DQ -> Q convert. An int16 fallback site is a 16-bit tensor between 8-bit
    ones, so its producer (8-bit inputs) and consumers (8-bit outputs) would mix types, which HTP refuses
    ("standalone DQ with per-channel quantization"). Such a unit is promoted to 16 bits: each 8-bit input
    passes an exact u8 -> u16 convert (scale/256, zero point*256: every value kept), and an 8-bit output is
    computed in 16 bits on the 8-bit grid/256 and then converted down (a second rounding, off from a direct
    8-bit rounding only within 1/512 LSB of a midpoint). Returns how many converts were inserted."""
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


def _fix_batch(path: Path, input_size: tuple[int, int]) -> None:
    """Batch 1, every shape static: QNN places nothing with a symbolic dimension."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import (
        fix_output_shapes,
        make_input_shape_fixed,
    )

    model = onnx.load(str(path))
    make_input_shape_fixed(model.graph, INPUT_NAME, [1, 3, *input_size])
    fix_output_shapes(model)
    onnx.save(model, str(path))


@functools.cache
def _ep_devices() -> tuple[Any, ...]:
    """Register the QNN plugin library with onnxruntime (once per process) and return its devices."""
    import onnxruntime as ort
    import onnxruntime_qnn as qnn

    if not any(d.ep_name == qnn.get_ep_name() for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(qnn.get_ep_name(), qnn.get_library_path())
    return tuple(d for d in ort.get_ep_devices() if d.ep_name == qnn.get_ep_name())


def _session(model: Any, opts: QnnOptions, fallback: bool, config: Optional[dict[str, str]] = None,
             provider: Optional[dict[str, str]] = None, quiet: bool = False) -> Any:
    """An onnxruntime session on QNN's HTP backend for `opts.soc`; `fallback` False: every node on HTP or fail
    (`quiet`: without onnxruntime's own error log, for a caller that handles the failure)."""
    import onnxruntime as ort
    import onnxruntime_qnn as qnn

    soc_model, arch, _ = SOCS[opts.soc]
    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(list(_ep_devices()), {
        "backend_path": qnn.get_qnn_htp_path(), "soc_model": str(soc_model), "htp_arch": str(arch),
        **(provider or {})})
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so)


def _compile_context(qdq: Path, context: Path, folder: Path, opts: QnnOptions) -> None:
    """Compile the QDQ model into the context binary, with QNN's op trace beside it. A model QNN cannot place
    whole is refused (VerificationError naming every node left off HTP and QNN's reason) unless CPU fallback
    is allowed."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    config = {"ep.context_enable": "1", "ep.context_file_path": str(context), "ep.context_embed_mode": "0"}
    trace = {"enable_framework_op_trace": "1", "framework_op_trace_dir": str(folder)}
    try:
        _session(qdq, opts, opts.allow_cpu_fallback, config, trace)
    except Fail as exc:
        if _FALLBACK_REFUSED not in str(exc) or not (folder / TRACE).is_file():
            raise
        refused = json.loads((folder / TRACE).read_text()).get("unsupported_nodes", [])
        names = "; ".join(f"{r['node_name']} ({r['op_type']}): {_reason(r)}" for r in refused[:8])
        more = f"; and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise VerificationError(
            f"[qnn] int8: {len(refused)} node(s) not placed on HTP ({opts.soc}): {names}{more} (not written; "
            "--allow-cpu-fallback writes it with those nodes on the CPU)") from None
    if not context.is_file():  # QNN claimed no node at all: no context binary to compile
        raise VerificationError(f"[qnn] int8: QNN placed no node of the model on HTP ({opts.soc}); nothing to compile")


def _reason(refusal: dict[str, Any]) -> str:
    return str(refusal.get("reason", "")).split(f"{refusal.get('op_type')} node `")[0].strip() or "no reason given"


@functools.cache
def _qnn_sdk_version() -> Optional[str]:
    from onnxruntime_qnn import build_and_package_info as info

    return getattr(info, "qnn_version", None)


# ----------------------------------------------------------------------------- manifest facts
_TOKEN = re.compile(r"_token_\d+$")


def placement_record(model: Any, trace: dict[str, Any]) -> dict[str, Any]:
    """Where QNN put every node, from its framework op trace of the context-binary compile.

    Node names are those of the graph onnxruntime hands to QNN: its NHWC layout transform inserts Transposes
    and renames the nodes it rewrites (suffix `_token_N`), so counts there differ from the QDQ file's."""
    summary = trace.get("summary", {})
    placed = [{"qnn_op": m.get("dst_qnn_op_type"), "qnn_node": m.get("dst_name"),
               "onnx_nodes": [s["name"] for s in m.get("sources", []) if s.get("type") == "OP"]}
              for g in trace.get("subgraph_traces", []) for m in g.get("op_mappings", [])]
    refused = [{"node": r.get("node_name"), "op": r.get("op_type"), "reason": _reason(r)}
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


def _initializers(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def htp_quantization(model: Any) -> dict[str, Any]:
    """The QDQ model against what QNN documents for HTP: uint8/uint16 activations, int8/uint8 weights
    (per-channel only for Conv/Gemm weights), MatMul per-tensor. Lists every departure."""
    inits = _initializers(model)
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
    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, Optional[int]] = {}
    for n in model.graph.node:
        if n.op_type not in _COMPUTE:
            continue
        dq = producers.get(n.input[0])
        zero = inits.get(dq.input[2]) if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) > 2 else None
        out[n.name] = None if zero is None else 8 * zero.dtype.itemsize
    return out


def _compute_record(model: Any, placement: dict[str, Any]) -> dict[str, Any]:
    """Convolutions and matmuls the NPU runs on integer inputs: every one QNN placed with 8-bit activations
    (16-bit ones counted apart), from the QDQ model's types and QNN's placement."""
    bits = _activation_bits(model)
    left_off = {_TOKEN.sub("", r["node"] or "") for r in placement["left_off_htp"]}
    on_htp = {k: v for k, v in bits.items() if k not in left_off}
    qnn_compute = sum(v for k, v in placement["qnn_ops"].items() if k in _QNN_COMPUTE)
    return {"int8": sum(1 for v in on_htp.values() if v == 8), "int16": sum(1 for v in on_htp.values() if v == 16),
            "total": len(bits), "qnn_compute_ops": qnn_compute,
            "float": [f"{k} ({'float input' if v is None else 'left off HTP'})" for k, v in bits.items()
                      if v is None or k in left_off],
            "source": "QDQ model activation types + QNN placement (framework op trace)"}


# ----------------------------------------------------------------------------- runtime
class QnnRunner(Runner):
    """The context binary in onnxruntime-qnn's HTP backend, which emulates the NPU on x86."""

    numbers = "emulated"
    threads = "QNN HTP emulator on the host CPU (not timed)"

    def __init__(self, context: Path, opts: QnnOptions) -> None:
        self.session = _session(context, opts, opts.allow_cpu_fallback)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def max_batch(self) -> Optional[int]:
        return 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))])


def _to_signed(values: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8/uint16 values and zero point on the signed int8/int16 grid PyTorch's quantizers use."""
    shift = {np.dtype(np.uint8): 128, np.dtype(np.uint16): 32768}.get(zero.dtype, 0)
    return np.asarray(values).astype(np.int32) - shift, int(zero) - shift


def emulated_quantized_tensors(path: Path, opts: QnnOptions, x: np.ndarray) -> tuple[list[QTensor], dict[str, Any]]:
    """Every quantized activation as the HTP emulator computes it: the QDQ model compiled again with each
    activation QuantizeLinear output added as a graph output (QNN returns those tensors as it holds them), run
    image by image. Its logits on the first image are compared with the deployed context binary's."""
    import onnx

    model = onnx.load(str(path / QDQ_MODEL))
    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    exposed: dict[str, tuple[float, np.ndarray, str]] = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2 and n.input[2] in inits:
            src = producers.get(n.input[0])
            exposed[n.output[0]] = (float(inits[n.input[1]].reshape(())), inits[n.input[2]].reshape(()),
                                    src.op_type if src is not None else "input")
    logits_name = model.graph.output[0].name
    for name, (_, zero, _) in exposed.items():
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(zero.dtype), None))
    # Whole on HTP where QNN takes it, so the input is quantized by HTP as in the deployed model. Otherwise the
    # layout Transposes onnxruntime adds to hand exposed NHWC tensors back as NCHW outputs stay on the CPU (HTP
    # refuses standalone uint16 Transposes; they only move values), and so may the input quantizer.
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    whole_on_htp = True
    try:
        session = _session(model.SerializeToString(), opts, False, quiet=True)
    except Fail as exc:
        if _FALLBACK_REFUSED not in str(exc):
            raise
        whole_on_htp = False
        session = _session(model.SerializeToString(), opts, True)
    names = [o.name for o in session.get_outputs()]
    feed = np.ascontiguousarray(x, np.float32)
    runs = [dict(zip(names, session.run(None, {INPUT_NAME: feed[i:i + 1]}))) for i in range(len(feed))]
    deployed = QnnRunner(path / CONTEXT_MODEL, opts)(feed[:1])  # one image: the emulator is slow
    logits = np.concatenate([r[logits_name] for r in runs[:1]])
    tensors = []
    for i, (name, (scale, zero, op)) in enumerate(exposed.items()):
        values, zp = _to_signed(np.concatenate([r[name] for r in runs]), zero)
        tensors.append(QTensor(name, scale, zp, values, i, op=op))
    info = {"runtime": "QNN HTP emulator: the QDQ model with every quantized activation exposed as an output",
            "exposed_run_vs_deployed_logits_max_abs": float(np.abs(logits - deployed).max()),
            "exposed_run_vs_deployed_on": "first image",
            "exposed_run_cpu_fallback": "none: every node on HTP" if whole_on_htp else
            "allowed: layout Transposes (and possibly the input quantizer) ran on the CPU"}
    return tensors, info


# ----------------------------------------------------------------------------- HTP's own arithmetic
@functools.lru_cache(maxsize=256)
def htp_add_table(soc: str, s_a: float, z_a: int, s_b: float, z_b: int, s_out: float, z_out: int) -> np.ndarray:
    """HTP's output for every pair of inputs of one uint8 QDQ Add (its requantization has no formula we could
    fit): a 256x256 table, indexed [b, a], from the emulator itself. The QNN simulation reads adds from it."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in (
        ("sa", s_a, np.float32), ("za", z_a, np.uint8), ("sb", s_b, np.float32), ("zb", z_b, np.uint8),
        ("so", s_out, np.float32), ("zo", z_out, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"]),
             helper.make_node("Add", ["ad", "bd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 256, 256]) for n in ("a", "b")]
    out = [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, 1, 256, 256])]
    model = helper.make_model(helper.make_graph(nodes, "htp_add", io, out, consts),
                              opset_imports=[helper.make_opsetid("", 21)])
    grid = np.arange(256, dtype=np.float32)
    a = np.broadcast_to(((grid - z_a) * np.float32(s_a))[None, :], (256, 256))
    b = np.broadcast_to(((grid - z_b) * np.float32(s_b))[:, None], (256, 256))
    session = _session(model.SerializeToString(), QnnOptions(soc=soc), False)
    feed = {"a": np.ascontiguousarray(a[None, None]), "b": np.ascontiguousarray(b[None, None])}
    return session.run(None, feed)[0][0, 0]


def htp_conv_biases(soc: str, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The int32 bias HTP compiles for each output channel of a QDQ conv (uint8 input with scale s_in and zero
    point z_in, int8 weights with per-channel `w_scales`, float `bias`), read from the emulator.

    HTP's bias is not round(bias / (s_in * w_scale)): it is off by up to about 1.5 accumulator units, whatever
    the weights and the output scale (measured), and no rounding formula we tried reproduces it. So probe convs
    with the layer's own input scale, weight scales and bias run once: input channels 0 and 1 a ramp over 4,096
    consecutive accumulator values (weights 1 and 16), the other channels constant, weighted to cancel most of
    each bias so outputs stay off the rails. Under the requantization rule of mnv4_deploy/htp_semantics.py the
    outputs pin each channel's bias; an output scale is tried per group of channels until each is pinned, and a
    channel no probe pins keeps round(bias / scale) (logged)."""
    w_scales, bias = np.asarray(w_scales, np.float32), np.asarray(bias, np.float32)
    nominal = np.round(bias.astype(np.float64) / scale_of(s_in, w_scales))
    offsets = np.arange(-4, 5)
    possible = np.ones((len(w_scales), len(offsets)), bool)
    probed = np.zeros(len(w_scales), bool)  # probed at a scale fine enough to pin it (multiplier >= 1/128)
    while True:
        todo = (possible.sum(axis=1) != 1) & ~probed
        if not todo.any():
            break
        largest = w_scales[todo].max()
        fits = _bias_probe(soc, s_in, z_in, w_scales, bias, nominal, offsets, float(8 * s_in * largest))
        on_scale = w_scales <= largest  # a channel with a larger scale saturates here: its outputs tell nothing
        possible[on_scale] &= fits[on_scale]
        probed |= w_scales >= largest / 16
    pinned = possible.sum(axis=1) == 1
    out = nominal.copy()
    out[pinned] = nominal[pinned] + offsets[possible[pinned].argmax(axis=1)]
    if not pinned.all():
        logger.warning(f"[qnn] HTP bias probe: {int((~pinned).sum())} of {len(out)} channels not pinned; "
                       "kept round(bias / scale) there")
    return out


def _bias_probe(soc: str, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray, nominal: np.ndarray,
                offsets: np.ndarray, s_out: float) -> np.ndarray:
    """One probe conv (see htp_conv_biases) at output scale `s_out`: which bias offsets fit each channel."""
    from ..htp_semantics import ambiguous_multipliers, exact_units, multiplier_units, requantize

    k = len(w_scales)
    level = 0 if z_in > 127 else 255  # constant inputs as far from the zero point as the grid allows
    step = level - z_in
    cancelling = max(1, int(np.ceil(np.abs(nominal).max() / (127 * abs(step) * 0.9))))
    weights = np.zeros((k, 2 + cancelling, 1, 1), np.int8)
    weights[:, 0], weights[:, 1] = 1, 16
    remaining = -nominal.copy()
    for j in range(2, 2 + cancelling):
        w = np.clip(np.round(remaining / step), -127, 127)
        weights[:, j, 0, 0] = w
        remaining -= w * step
    cancel = -nominal - remaining  # what the constant channels add to each accumulator
    z_out = 128
    i = np.arange(4096)
    low, high = i % 16, i // 16  # acc = low + 16 * high - 17 * z_in: every value of a 4,096-long range once
    xq = np.empty((1, weights.shape[1], 64, 64), np.int64)
    xq[0, 0], xq[0, 1], xq[0, 2:] = low.reshape(64, 64), high.reshape(64, 64), level
    got = run_qdq_conv(soc, weights, w_scales, bias, s_in, z_in, s_out, z_out, xq).reshape(k, -1)
    multiplier = (scale_of(s_in, w_scales) / np.float64(np.float32(s_out)))[:, None]
    acc = ((low - z_in) + 16 * (high - z_in))[None, :] + cancel[:, None]
    # a multiplier within a hair of a tie may be rounded either way: either fits
    units = multiplier_units(multiplier)
    tie = ambiguous_multipliers(multiplier[:, 0])
    lower = np.floor(exact_units(multiplier))
    return np.stack([np.any([(requantize(acc + (nominal + o)[:, None], multiplier, z_out, 0, 255, u) == got).all(axis=1)
                             & ((u == units)[:, 0] | tie) for u in (lower, lower + 1)], axis=0)
                     for o in offsets], axis=1)


def run_qdq_conv(soc: str, weights: np.ndarray, w_scales: np.ndarray, bias: np.ndarray, s_in: float, z_in: int,
                 s_out: float, z_out: int, xq: np.ndarray, group: int = 1, stride: int = 1, pad: int = 0) -> np.ndarray:
    """One uint8 QDQ conv (int8 per-channel weights, float bias) compiled for HTP on `soc`, run on the integer
    inputs `xq` (NCHW, batch 1): its uint8 outputs. The probes' and the HTP benchmark's building block."""
    from onnx import TensorProto, helper, numpy_helper

    k = weights.shape[0]
    _, c, h, w = xq.shape
    out_h, out_w = (h + 2 * pad - weights.shape[2]) // stride + 1, (w + 2 * pad - weights.shape[3]) // stride + 1
    consts = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in (
        ("s_in", s_in, np.float32), ("z_in", z_in, np.uint8), ("s_out", s_out, np.float32), ("z_out", z_out, np.uint8))]
    consts += [numpy_helper.from_array(weights.astype(np.int8), "w"),
               numpy_helper.from_array(np.asarray(w_scales, np.float32), "sw"),
               numpy_helper.from_array(np.zeros(k, np.int8), "zw"), numpy_helper.from_array(np.asarray(bias, np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], group=group, strides=[stride] * 2, pads=[pad] * 4),
             helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["yq"])]
    graph = helper.make_graph(nodes, "htp_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, k, out_h, out_w])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = ((xq - z_in) * np.float32(s_in)).astype(np.float32)
    return _session(model.SerializeToString(), QnnOptions(soc=soc), False).run(None, {"x": x})[0][0].astype(np.int64)


def scale_of(s_in: float, w_scales: np.ndarray) -> np.ndarray:
    """A conv's accumulator scale per output channel, as QNN computes it (float32 operands)."""
    return np.float64(np.float32(s_in)) * np.asarray(w_scales, np.float32).astype(np.float64)


@dataclass(frozen=True)
class EmulatorProbes:
    """mnv4_deploy.htp_semantics.HtpProbes answered by the HTP emulator for one SoC (ops probed alone, on
    synthetic inputs: never on the model's images)."""

    soc: str

    def add_table(self, s_a: float, z_a: int, s_b: float, z_b: int, s_out: float, z_out: int) -> np.ndarray:
        return htp_add_table(self.soc, s_a, z_a, s_b, z_b, s_out, z_out)

    def conv_biases(self, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return htp_conv_biases(self.soc, s_in, z_in, w_scales, bias)

