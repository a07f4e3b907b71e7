"""QNN target: Qualcomm's Hexagon NPU (HTP) through onnxruntime-qnn.

The artifact is a folder an app ships: the QDQ ONNX model made for the HTP backend (static shapes, uint8 or
uint16 activations, int8 per-channel conv weights) and the compiled context binary (`EPContext` model plus its
`.bin`) for one Snapdragon SoC, which is what an app loads on the device. On x86 the HTP backend
(`libQnnHtp.so`) emulates the NPU: numbers are "emulated", never timed. Placement is proven, not assumed: the
context binary is compiled and verified with CPU fallback disabled, and QNN's own framework op trace (which
node went where, and why a node was refused) is kept beside it and summarised in the manifest.

The package: target.py (the target, its runner, the emulated intermediates), context.py (HTP sessions, the
context-binary compile), placement.py (what QNN did, for the manifest), passes/ (QDQ graph rewrites for HTP),
htp_semantics.py (HTP's own integer arithmetic for the simulation) and probes.py (the emulator asked directly).
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...config.options import choice, option
from ...quantization.simulation_semantics import EXACT, Semantics
from ...verify.tensorwise import QTensor
from ..base import ExportRequest, Runner, RuntimeTensors, Target
from ..onnx.export import DEFAULT_OPSET, INPUT_NAME, INT16_OPSET, export_onnx
from ..onnx.passes.unsigned_activations import activations_to_uint8, activations_to_unsigned
from .context import FALLBACK_REFUSED, SOCS, TRACE, compile_context, qnn_sdk_version, session
from .passes.boundary_converts import convert_boundaries
from .placement import compute_record, htp_quantization, initializers, placement_record
from .probes import EmulatorProbes

logger = logging.getLogger(__name__)

QDQ_MODEL, CONTEXT_MODEL = "model.qdq.onnx", "model_ctx.onnx"
MODELLED_HTP_ARCH = 73  # htp_semantics.py's rule holds bit for bit from HTP v73 on (measured)


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
    work_seconds = 40
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
        opset = INT16_OPSET if request.quantized.int16_sites else DEFAULT_OPSET
        export_onnx(request.quantized.converted(fold_weights=True), request.example, qdq, opset)
        to_uint8 = activations_to_uint8(qdq)
        to_uint16 = _int16_to_uint16(qdq)
        converts = convert_boundaries(qdq) if to_uint16 else 0
        _fix_batch(qdq, request.loaded.preprocessing.input_size)
        soc_model, arch, soc_name = SOCS[opts.soc]
        compile_context(qdq, path / CONTEXT_MODEL, path, opts)
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
                "qnn_sdk": qnn_sdk_version()}

    def verifies_every_image(self, request: ExportRequest) -> bool:
        return not request.options.emulated_images  # the HTP emulator: at most that many images per set

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
            "int8_compute": compute_record(model, placement),
        }

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        return emulated_quantized_tensors(path, request.options, x)

    def simulation_semantics(self, request: ExportRequest) -> Semantics:
        """HTP's own requantization (htp_semantics.py here), with the conv biases and Add tables HTP
        compiles for this SoC probed from the emulator. The rule was measured on HTP v73 and later (SM8550,
        SM8650, SM8750, bit for bit); v68/v69 round otherwise, and are compared with the exact simulation."""
        from .htp_semantics import htp_graph

        soc = request.options.soc
        if SOCS[soc][1] < MODELLED_HTP_ARCH:
            return EXACT
        return Semantics(f"htp-{soc}", f"Qualcomm HTP ({soc}): conv/linear requantization by shift and 12-bit "
                         "multiplier rounding half up, global pool rounding half up, conv biases and 8-bit Adds as "
                         "the emulator compiles them (probed on synthetic inputs), strided depthwise convs with the "
                         "zero point folded in and a Q15 multiplier; 16-bit activations and other ops exact "
                         "(mnv4_deploy/targets/qnn/htp_semantics.py)",
                         functools.partial(htp_graph, probes=EmulatorProbes(soc)))


# ----------------------------------------------------------------------------- export helpers
def _int16_to_uint16(path: Path) -> int:
    """int16 activation zero points as uint16 (+32768, same scale): the same real values in the 16-bit type
    QNN's HTP runs (it documents uint8/uint16 activations). Returns how many zero points changed."""
    return activations_to_unsigned(path, np.int16)


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


# ----------------------------------------------------------------------------- runtime
class QnnRunner(Runner):
    """The context binary in onnxruntime-qnn's HTP backend, which emulates the NPU on x86."""

    numbers = "emulated"
    threads = "QNN HTP emulator on the host CPU (not timed)"

    def __init__(self, context: Path, opts: QnnOptions) -> None:
        self.session = session(context, opts.soc, opts.allow_cpu_fallback)
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
    inits = initializers(model)
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
        runtime = session(model.SerializeToString(), opts.soc, False, quiet=True)
    except Fail as exc:
        if FALLBACK_REFUSED not in str(exc):
            raise
        whole_on_htp = False
        runtime = session(model.SerializeToString(), opts.soc, True)
    names = [o.name for o in runtime.get_outputs()]
    feed = np.ascontiguousarray(x, np.float32)
    runs = [dict(zip(names, runtime.run(None, {INPUT_NAME: feed[i:i + 1]}))) for i in range(len(feed))]
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
