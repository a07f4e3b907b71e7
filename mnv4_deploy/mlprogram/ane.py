"""Static Neural Engine fit of a Core ML ML Program: which ops would leave the Neural Engine, run as float, or
only pay for quantize/dequantize, judged from the program itself.

Why static: Core ML cannot run on Linux, and the known field failure this guards against (MLCommons
mobile_app_open issue 865: MNv4-Conv-L W8A8 at 233 ms against 2.31 ms float, because it fell off the Neural
Engine) is visible in the program before any device sees it. On macOS 14.4+ `MLComputePlan` reports the real
placement; this check is what Linux can say, and every rule names the published guidance it rests on. Where the
guidance is silent or third-party the finding says so (`certainty`) instead of inventing a rule.

`check_program(spec)` takes `coremltools.models.utils.load_spec(path)` of a saved .mlpackage and returns a
JSON-able dict {"findings": [...], "summary": {...}}.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .toolchain import import_coremltools

# ---------------------------------------------------------------- sources (cited by the rules below)
DOC_QUANT_OVERVIEW = ("coremltools docs, Quantization Overview (https://apple.github.io/coremltools/docs-guides/"
                      "source/opt-quantization-overview.html)")
DOC_PERFORMANCE = ("coremltools docs, Quantization > Performance (https://apple.github.io/coremltools/docs-guides/"
                   "source/opt-quantization-perf.html)")
DOC_WHATS_NEW = ("coremltools docs, Optimization > What's new, 'Software Availability of Optimizations' "
                 "(https://apple.github.io/coremltools/docs-guides/source/opt-whats-new.html)")
DOC_TYPED_EXECUTION = ("coremltools docs, Typed Execution (https://apple.github.io/coremltools/docs-guides/source/"
                       "typed-execution.html)")
SRC_ACT_PASS = ("coremltools source, optimize/coreml/_quantization_passes.py insert_prefix_quantize_dequantize_pair"
                ".SUPPORTED_OP_TYPES and converters/mil/mil/passes/defs/optimize_activation_quantization.py "
                "insert_suffix_quantize_dequantize_pair (what linear_quantize_activations quantizes)")
SRC_TORCH_QUANTIZER = ("coremltools source, optimize/torch/quantization/_coreml_quantizer.py (patterns "
                       "CoreMLQuantizer annotates: conv, linear, add, mul, matmul, pools, flatten)")
SRC_OP_REGISTRY = ("coremltools source, converters/mil/mil/ops/registry.py SSAOpRegistry.core_ops (the oldest "
                   "opset defining each op) and coremltools/__init__.py _OPSET")
THIRD_PARTY_UNSUPPORTED = ("third party: hollance/neural-engine docs/unsupported-layers.md ('known to not work on "
                           "the ANE ... some of these are guesses'; observed on neuralnetwork models)")

# ---------------------------------------------------------------- what each rule means
EFFECTS = {
    "off_neural_engine": "runs off the Neural Engine (CPU/GPU), with a device switch around it",
    "runs_as_float": "runs as float16 (no int8-int8 compute for this op)",
    "dequantized_at_load": "weights decompressed to float (at load on CPU/GPU; just in time on the Neural Engine)",
    "overhead": "quantize/dequantize with no int8 consumer: pure overhead, the op runs as float",
    "rejected": "the program declares an opset older than this op: Core ML refuses to compile it",
    "overflow": "dequantized values beyond float16's range (65504): inf on float16 compute",
}
FP16_MAX = 65504.0  # IEEE 754 binary16; coremltools' fp16 pass uses the same bound (add_fp16_cast.fp16_overflow)


@dataclass(frozen=True)
class Rule:
    id: str
    effect: str  # a key of EFFECTS
    certainty: str  # documented | tool-source | uncertain | third-party
    source: str
    text: str


RULES = {r.id: r for r in (
    # "Activation quantization is available in iOS17/macOS14/watchOS10/tvOS10" (Quantization Overview,
    # 'Feature Availability'); iOS18 adds constexpr_blockwise_shift_scale etc. (What's new table). The per-op
    # minimum comes from coremltools' own op registry, so the check follows the installed MIL spec.
    Rule("ane.deployment_target", "rejected", "documented", f"{DOC_QUANT_OVERVIEW}, 'Feature Availability'; "
         f"{DOC_WHATS_NEW}; {SRC_OP_REGISTRY}",
         "op needs a newer opset than the program declares"),
    # The Neural Engine computes in float16: fp32-typed ops are placed on CPU/GPU. Apple's Typed Execution page
    # says the defaults run 'portions of your model ... in float 16 precision' for performance and that 'the CPU
    # guarantees float 32 precision'; that fp32 ops never run on the Neural Engine is not stated as a rule there
    # (third-party measurement: hollance/neural-engine docs/16-bit.md, 'The ANE appears to use float16 for
    # everything'). Hence certainty 'uncertain' on the wording, though no counterexample is known.
    Rule("ane.fp32_compute", "off_neural_engine", "uncertain",
         f"{DOC_TYPED_EXECUTION}, 'Choosing the Appropriate Precision'; third party: hollance/neural-engine "
         "docs/16-bit.md",
         "float32 compute: the Neural Engine computes in float16, so this op is expected on CPU/GPU"),
    # "Activations are quantized using per-tensor mode" (Quantization Overview, 'Activation Quantization');
    # linear_quantize_activations computes one scale per tensor (_construct_quant_dequant_op). A per-channel
    # activation scale is valid MIL (quantize has `axis`), but no Apple page says the Neural Engine's int8 path
    # takes it: what happens is undocumented.
    Rule("ane.per_channel_activation", "runs_as_float", "uncertain",
         f"{DOC_QUANT_OVERVIEW}, 'Activation Quantization'; {SRC_ACT_PASS}",
         "per-channel activation scale: Apple documents per-tensor activations only; the Neural Engine int8 path "
         "for this is undocumented (expected: dequantized and computed in float16)"),
    # linear_quantize_activations puts quantize/dequantize only before conv, linear, add, avg_pool, max_pool
    # (and after them, optionally through relu/relu6/leaky_relu/tanh/scaled_tanh/sigmoid/hard_sigmoid): those are
    # the ops Apple's own W8A8 feeds int8. A dequantize whose consumers are none of these rounds to int8 and
    # straight back for an op that computes in float: overhead only.
    Rule("ane.qdq_overhead", "overhead", "tool-source", SRC_ACT_PASS,
         "activation quantized but no consumer takes int8 (per coremltools' activation quantization pass)"),
    # Apple's PyTorch-side CoreMLQuantizer also quantizes around mul, matmul, adaptive average pooling
    # (reduce_mean in MIL) and flatten (reshape); its MIL pass does not. Whether the Neural Engine computes these
    # in int8 is not documented.
    Rule("ane.qdq_uncertain_consumer", "runs_as_float", "uncertain", f"{SRC_TORCH_QUANTIZER}; {SRC_ACT_PASS}",
         "activation quantized for an op Apple's PyTorch quantizer quantizes but its MIL pass does not; "
         "int8 compute on the Neural Engine undocumented"),
    # W8A8 = int8 weights and activations (API Overview, 'Quantizing weights and activations': quantize the
    # activations, then linear_quantize_weights 'to get an W8A8 model'). A float weight constant in a program
    # with quantized activations keeps that op on float16 compute.
    Rule("ane.float_weight", "runs_as_float", "documented",
         "coremltools docs, Quantization > API Overview, 'Quantizing weights and activations' "
         "(https://apple.github.io/coremltools/docs-guides/source/opt-quantization-api.html)",
         "weight is a float constant in a program with quantized activations"),
    # linear_quantize_activations quantizes the input of every conv/linear/add/pool; one left float in a W8A8
    # program computes in float16 ('int8-int8 compute' needs both operands int8: Performance page).
    Rule("ane.unquantized_input", "runs_as_float", "tool-source", f"{SRC_ACT_PASS}; {DOC_PERFORMANCE}",
         "input activation not quantized in a program with quantized activations"),
    # Weight-only: "This latency advantage is available only when quantized weights are loaded from memory and are
    # decompressed 'just in time' of computation. Starting with iOS17/macOS14, this is more likely to happen for
    # models running primarily on the Neural Engine backend." CPU (and sometimes GPU) decompress at load time.
    Rule("ane.weight_only", "dequantized_at_load", "documented",
         f"{DOC_QUANT_OVERVIEW}, 'Impact on Latency and Compute Unit Considerations'; {DOC_PERFORMANCE}",
         "compressed weight with a float activation: float16 compute; the weight is decompressed at load on "
         "CPU/GPU, just in time (smaller reads) only on the Neural Engine"),
    # An activation quantizer whose int8 grid reaches past float16's largest value cannot be dequantized on
    # float16 compute (the Neural Engine's; see ane.fp32_compute for that claim's sources), and a scale of 0, inf
    # or NaN is no grid at all (coremltools' own linear_quantize_activations computes (max - min) in float16 and
    # gets inf when a tensor spans more than 65504: optimize/coreml/_quantization_passes.py
    # _construct_quant_dequant_op via optimize/_utils.py get_min_and_max_values).
    Rule("ane.fp16_range", "overflow", "documented", f"IEEE 754 binary16 (max 65504); {DOC_TYPED_EXECUTION}; "
         "coremltools source, converters/mil/mil/passes/defs/quantization.py add_fp16_cast.fp16_overflow",
         "activation quantization grid beyond float16's range, or a zero/non-finite scale"),
    # No Apple list of Neural Engine ops exists; the only public list is third-party and partly guessed.
    Rule("ane.op_unsupported", "off_neural_engine", "third-party", THIRD_PARTY_UNSUPPORTED,
         "op type reported (third party) not to run on the Neural Engine"),
)}

# ---------------------------------------------------------------- op sets behind the rules
# insert_prefix_quantize_dequantize_pair.SUPPORTED_OP_TYPES (tests check this against the installed coremltools).
INT8_OPS = ("conv", "linear", "add", "avg_pool", "max_pool")
# Ops CoreMLQuantizer (PyTorch side) also quantizes, as they appear in MIL (adaptive_avg_pool2d -> reduce_mean,
# flatten -> reshape).
INT8_OPS_TORCH_ONLY = ("mul", "matmul", "reduce_mean", "reshape")
WEIGHTED_OPS = {"conv": "weight", "linear": "weight", "conv_transpose": "weight", "matmul": "y"}
# hollance/neural-engine unsupported-layers.md: RNN layers, gather, dilated convolutions (checked separately).
UNSUPPORTED_OPS = ("lstm", "gru", "rnn", "gather", "gather_nd", "gather_along_axis")
NOT_COMPUTE = ("const", "cast")  # format changes at the program's edges are not compute

# Apple (Performance page): on A17 Pro / M4 and newer 'there is increased throughput possible for int8-int8 compute
# on Neural Engine'; CPU (and sometimes GPU) see 'a considerable slowdown'. Its own table measures W8A8 faster than
# float16 on an A16 too (MobileNetV2 0.27 vs 0.48 ms), so 'older Neural Engines just dequantize' is NOT stated.
DEVICE_NOTE = ("W8A8 pays off only on the Neural Engine: Apple reports increased int8-int8 throughput on A17 Pro / "
               "M4 and newer, and 'a considerable slowdown' on CPU (and sometimes GPU), recommending activation "
               "quantization 'only when your model is fully or mostly running on the Neural Engine' "
               f"({DOC_PERFORMANCE}). How older Neural Engines execute int8 activations is not documented (Apple's "
               "table shows W8A8 faster than float16 on an A16 as well).")
NOT_CHECKED = ("tensor-size and kernel-size limits of the Neural Engine: no Apple-published limit found",
               "the real placement: MLComputePlan on macOS 14.4+ (CoremlTarget.describe reports it there)")


def manifest_entry(spec: Any, examples: int = 3) -> dict[str, Any]:
    """The summary plus a few example findings per rule: what a manifest's `structure` should carry (the full
    list repeats one rule per op, e.g. 46 convs of a weights-only model)."""
    result = check_program(spec)
    shown: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for f in result["findings"]:
        if len(shown[f["rule"]]) < examples:
            shown[f["rule"]].append({k: f[k] for k in ("op", "op_type", "detail")})
    rules = {rid: {"effect": RULES[rid].effect, "what_happens": EFFECTS[RULES[rid].effect],
                   "certainty": RULES[rid].certainty, "source": RULES[rid].source, "examples": ex}
             for rid, ex in shown.items()}
    return result["summary"] | {"rules": rules}


# ---------------------------------------------------------------- calibration warning
# The field failure above lost 17 points of top-1 (81.14% -> 63.96%) from calibrating on unrepresentative data.
_SYNTHETIC_SETS = {"skimage-photos": "scikit-image's 12 sample photographs (random crops), not your data"}


def calibration_warning(calibration_set_name: Optional[str]) -> Optional[str]:
    """A loud one-paragraph warning when a CoreML W8A8 model was calibrated without images of the task.

    W8A8 bakes every activation range into the program; on the Neural Engine nothing re-calibrates them later.
    None when the set names real data (a folder or a pinned set other than the scikit-image default)."""
    if calibration_set_name is None:
        what = "no calibration set recorded"
    elif calibration_set_name in _SYNTHETIC_SETS:
        what = _SYNTHETIC_SETS[calibration_set_name]
    else:
        return None
    return ("WARNING: this CoreML W8A8 (int8 activation) model was calibrated on " + what + ". Its int8 "
            "activation ranges are fixed inside the ML Program; with unrepresentative calibration a published "
            "MobileNetV4 W8A8 CoreML model fell from 81.1% to 64.0% top-1 (MLCommons mobile_app_open issue 865). "
            "Re-run with --calib DIR (a few hundred training images of your classes) or a calibration set "
            "(mnv4-deploy calib make).")


# ---------------------------------------------------------------- program walking
@dataclass
class _Op:
    type: str
    name: str  # first output name (ops are named by their outputs in findings)
    inputs: dict[str, list[str]]
    outputs: list[tuple[str, int, tuple[int, ...]]]  # (name, MIL dataType code, shape)
    proto: Any


class _Program:
    """One function of an ML Program as producer/consumer maps over variable names (nested blocks flattened)."""

    def __init__(self, spec: Any, function: str = "main") -> None:
        program = spec.mlProgram
        if function not in program.functions:
            raise ValueError(f"no function '{function}' in the ML Program (has: {', '.join(program.functions)})")
        fn = program.functions[function]
        self.opset = fn.opset
        block = fn.block_specializations[fn.opset]
        self.outputs = set(block.outputs)
        self.ops = list(_walk(block))
        self.producer = {o[0]: op for op in self.ops for o in op.outputs}
        self.consumers: dict[str, list[tuple[_Op, str]]] = collections.defaultdict(list)
        for op in self.ops:
            for key, names in op.inputs.items():
                for n in names:
                    self.consumers[n].append((op, key))

    def const(self, name: str) -> Optional[_Op]:
        op = self.producer.get(name)
        return op if op is not None and op.type == "const" else None

    def input_op(self, op: _Op, key: str) -> Optional[_Op]:
        names = op.inputs.get(key)
        return self.producer.get(names[0]) if names else None


def _walk(block: Any) -> Iterator[_Op]:
    for op in block.operations:
        outputs = [(o.name, o.type.tensorType.dataType, tuple(d.constant.size for d in o.type.tensorType.dimensions))
                   for o in op.outputs]
        yield _Op(op.type, op.outputs[0].name if op.outputs else op.type,
                  {k: [a.name for a in v.arguments if a.name] for k, v in op.inputs.items()}, outputs, op)
        for inner in op.blocks:
            yield from _walk(inner)


def _dtype(code: int) -> str:
    import_coremltools()
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code).lower()


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _scalar_int(op: Optional[_Op]) -> Optional[int]:
    """The value of a scalar int8/uint8 const stored inline (zero points are); None when not readable here."""
    if op is None or "val" not in op.proto.attributes:
        return None
    value = op.proto.attributes["val"]
    if value.WhichOneof("value") != "immediateValue" or value.immediateValue.tensor.WhichOneof("value") != "bytes":
        return None
    raw = value.immediateValue.tensor.bytes.values
    if len(raw) != 1:
        return None
    signed = _dtype(value.type.tensorType.dataType) == "int8"
    return int.from_bytes(raw, "little", signed=signed)


# ---------------------------------------------------------------- the check
def check_path(path: str | Path, function: str = "main") -> dict[str, Any]:
    """check_program on a saved .mlpackage."""
    ct = import_coremltools()

    return check_program(ct.utils.load_spec(str(path)), function)


def check_program(spec: Any, function: str = "main") -> dict[str, Any]:
    """Findings and a summary of how the program is expected to map onto the Neural Engine (see module doc)."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"not an ML Program (model type {spec.WhichOneof('Type')}): the check reads MIL ops")
    prog = _Program(spec, function)
    findings: list[dict[str, Any]] = []

    def add(rule_id: str, op: _Op, detail: str) -> None:
        rule = RULES[rule_id]
        findings.append({"op": op.name, "op_type": op.type, "rule": rule_id, "effect": rule.effect,
                         "what_happens": EFFECTS[rule.effect], "detail": detail, "certainty": rule.certainty,
                         "source": rule.source})

    quantizes = [op for op in prog.ops if op.type == "quantize"]
    activation_quant = bool(quantizes)
    _deployment(prog, add)
    _fp32(prog, add)
    _activations(prog, quantizes, add)
    _weights(prog, activation_quant, add)
    if activation_quant:
        _unquantized_inputs(prog, add)
    _unsupported(prog, add)
    return {"findings": findings, "summary": _summary(prog, quantizes, findings)}


def _deployment(prog: _Program, add: Any) -> None:
    ct = import_coremltools()
    import_coremltools()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    version = _opset_version(prog.opset)
    if version is None:
        return
    for op in prog.ops:
        registered = SSAOpRegistry.core_ops.get(op.type)
        if not registered:
            continue
        oldest = min(int(t) for t in registered)
        if oldest > version:
            need = ct._OPSET.get(oldest, str(oldest))
            add("ane.deployment_target", op, f"{op.type} exists from opset {need} "
                f"({_target_name(oldest)}); the program declares {prog.opset} ({_target_name(version)})")


def _opset_version(opset: str) -> Optional[int]:
    """Specification version of an opset name ('CoreML7' -> 8, i.e. iOS17)."""
    ct = import_coremltools()

    return {name: v for v, name in ct._OPSET.items()}.get(opset)


def _target_name(version: Optional[int]) -> str:
    ct = import_coremltools()

    names = [t.name for t in ct.target if int(t) == version and t.name.startswith("iOS")]
    return names[0] if names else f"unknown (spec {version})"


def _fp32(prog: _Program, add: Any) -> None:
    compute = [op for op in prog.ops if op.type not in NOT_COMPUTE and not op.type.startswith("constexpr_")]
    fp16_program = any(_dtype(code) == "float16" for op in compute for _, code, _ in op.outputs)
    for op in compute:
        if any(_dtype(code) == "float32" for _, code, _ in op.outputs):
            # coremltools' FP16ComputePrecision (passes/defs/quantization.py add_fp16_cast) leaves an op in
            # float32 when a constant input overflows float16 (fp16_overflow: |x| > 65504) or its type is in
            # _UNSUPPORTED_FP16_OPS, and wraps it in casts: one float32 island in a float16 program.
            add("ane.fp32_compute", op, "float32 op inside a float16 program (coremltools' fp16 pass kept it: a "
                "constant input beyond float16's range, or an op it does not cast); casts around it"
                if fp16_program else "float32 program")


def _activations(prog: _Program, quantizes: list[_Op], add: Any) -> None:
    for q in quantizes:
        reach = _reach(prog, q)
        if reach is not None and not (0 < reach <= FP16_MAX):
            add("ane.fp16_range", q, f"largest dequantized |value| {reach:.6g}")
        scale = prog.input_op(q, "scale")
        if (scale is not None and _size(scale.outputs[0][2]) > 1) or q.inputs.get("axis"):
            add("ane.per_channel_activation", q, f"scale has {_size(scale.outputs[0][2]) if scale else '?'} values")
    for dq in (op for op in prog.ops if op.type == "dequantize"):
        if not _is_quantized_activation(prog, dq.name):
            continue  # a weight stored as int8 const + dequantize, not an activation
        consumers = prog.consumers.get(dq.name, [])
        kinds = {c.type for c, _ in consumers} | ({"<program output>"} if dq.name in prog.outputs else set())
        if kinds & set(INT8_OPS):
            continue
        if kinds and kinds <= set(INT8_OPS_TORCH_ONLY):
            add("ane.qdq_uncertain_consumer", dq, f"consumed by {', '.join(sorted(kinds))}")
        else:
            add("ane.qdq_overhead", dq, f"consumed by {', '.join(sorted(kinds)) or 'nothing'}")


def _scale_values(op: Optional[_Op]) -> Optional[list[float]]:
    """A const scale stored inline (float16 bytes or float32 floats); None when stored in the weight file."""
    if op is None or op.type != "const":
        return None
    value = op.proto.attributes["val"]
    if value.WhichOneof("value") != "immediateValue":
        return None
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "floats":
        return list(tensor.floats.values)
    if kind == "bytes" and _dtype(value.type.tensorType.dataType) == "float16":
        return [float(v) for v in np.frombuffer(tensor.bytes.values, np.float16)]
    return None


def _reach(prog: _Program, q: _Op) -> Optional[float]:
    """Largest |dequantized value| of an activation quantizer: scale * the farthest integer from its zero point."""
    scales = _scale_values(prog.input_op(q, "scale"))
    if not scales:
        return None
    zp = _scalar_int(prog.const(q.inputs["zero_point"][0])) if q.inputs.get("zero_point") else 0
    if zp is None:
        return None
    lo, hi = (-128, 127) if _dtype(q.outputs[0][1]) == "int8" else (0, 255)
    return max(abs(s) for s in scales) * max(abs(lo - zp), abs(hi - zp))


def _is_quantized_activation(prog: _Program, name: str) -> bool:
    """Whether `name` is a dequantize of a computed int8 tensor (not of a stored int8 weight)."""
    op = prog.producer.get(name)
    if op is None or op.type != "dequantize":
        return False
    source = prog.input_op(op, "input")
    return source is None or not (source.type == "const" or source.type.startswith("constexpr_"))


def _weights(prog: _Program, activation_quant: bool, add: Any) -> None:
    for op in prog.ops:
        key = WEIGHTED_OPS.get(op.type)
        if key is None or not op.inputs.get(key):
            continue
        weight = prog.input_op(op, key)
        compressed = weight is not None and (weight.type.startswith("constexpr_") or weight.type == "dequantize"
                                             and not _is_quantized_activation(prog, weight.name))
        is_const = weight is not None and weight.type == "const"
        if not (compressed or is_const):
            continue  # both operands are activations (e.g. attention matmul): no weight to judge
        if activation_quant and is_const:
            add("ane.float_weight", op, f"{key} is a {_dtype(weight.outputs[0][1])} constant "
                f"{list(weight.outputs[0][2])}")
        elif not activation_quant and compressed:
            add("ane.weight_only", op, f"{key} from {weight.type}, activations float")


def _unquantized_inputs(prog: _Program, add: Any) -> None:
    """Ops Apple's activation quantization feeds int8 (INT8_OPS) whose activation input is float here."""
    for op in prog.ops:
        if op.type not in INT8_OPS:
            continue
        for key in ("x", "y") if op.type == "add" else ("x",):
            names = op.inputs.get(key)
            source = prog.producer.get(names[0]) if names else None
            if not names or source is not None and (source.type == "const" or source.type.startswith("constexpr_")):
                continue  # a constant operand (a bias added as a tensor), not an activation
            if not _is_quantized_activation(prog, names[0]):
                add("ane.unquantized_input", op, f"{key} is not dequantized from an int8 tensor")


def _unsupported(prog: _Program, add: Any) -> None:
    for op in prog.ops:
        if op.type in UNSUPPORTED_OPS:
            add("ane.op_unsupported", op, f"{op.type} (listed as not running on the Neural Engine)")
        elif op.type == "conv":
            dil = prog.input_op(op, "dilations")
            values = list(dil.proto.attributes["val"].immediateValue.tensor.ints.values) if dil is not None else []
            if any(v > 1 for v in values):
                add("ane.op_unsupported", op, f"dilated convolution (dilations {values})")


def _summary(prog: _Program, quantizes: list[_Op], findings: list[dict[str, Any]]) -> dict[str, Any]:
    counts = collections.Counter(f["rule"] for f in findings)
    compute = [op for op in prog.ops if op.type not in NOT_COMPUTE and not op.type.startswith("constexpr_")
               and op.type not in ("quantize", "dequantize")]
    float_types = collections.Counter(_dtype(code) for op in compute for _, code, _ in op.outputs
                                      if _dtype(code).startswith("float"))
    act_dtypes = collections.Counter(_dtype(q.outputs[0][1]) for q in quantizes)
    # Asymmetric: a zero point other than 0 (coremltools itself rewrites uint8 with zero point 128, the torch-side
    # symmetric form, as int8 with zero point 0; int8 with zero point -128 as uint8 with 0).
    zero_points = [_scalar_int(prog.const(q.inputs["zero_point"][0])) if q.inputs.get("zero_point") else 0
                   for q in quantizes]
    asymmetric = sum(1 for zp in zero_points if zp is not None and zp != 0)
    reaches = [r for r in (_reach(prog, q) for q in quantizes) if r is not None]
    int8_into_other = collections.Counter(c.type for q in quantizes for c, _ in prog.consumers.get(q.name, [])
                                          if c.type != "dequantize")
    int8_compute = sum(1 for op in compute if op.type in INT8_OPS and op.inputs.get("x")
                       and _is_quantized_activation(prog, op.inputs["x"][0]))
    off = [f for f in findings if f["effect"] in ("off_neural_engine", "rejected")]
    off_sure = [f for f in off if f["certainty"] not in ("third-party",)]
    on_ane = "no" if off_sure else ("uncertain" if off else "expected")
    as_float = [f for f in findings if f["effect"] in ("runs_as_float",) and f["rule"] != "ane.qdq_uncertain_consumer"]
    if not quantizes:
        int8 = "none"
    elif as_float:
        int8 = "partial"
    else:
        int8 = "throughout"
    precision = ("mixed" if len(float_types) > 1 else
                 {"float16": "float16", "float32": "float32"}.get(next(iter(float_types), ""), "none"))
    verdict = _verdict(on_ane, int8, counts, bool(quantizes))
    return {
        "opset": prog.opset,
        "deployment_target": _target_name(_opset_version(prog.opset)),
        "compute_ops": len(compute),
        "compute_precision": precision,
        "activation_quantization": bool(quantizes),
        "quantize_ops": len(quantizes),
        "activation_dtypes": dict(act_dtypes),
        "asymmetric_activations": asymmetric,
        # headroom to float16's 65504 on the compute the Neural Engine does (largest over activation quantizers)
        "max_dequantized_abs": round(max(reaches), 1) if reaches else None,
        "int8_tensors_into_other_ops": dict(int8_into_other),
        "int8_compute_ops": int8_compute,
        "counts": dict(sorted(counts.items())),
        "neural_engine": on_ane,
        "int8_activations": int8,
        "wholly_on_neural_engine_int8": on_ane == "expected" and int8 == "throughout",
        "verdict": verdict,
        "device_note": DEVICE_NOTE if quantizes else None,
        "not_checked": list(NOT_CHECKED),
    }


def _verdict(on_ane: str, int8: str, counts: collections.Counter, quantized: bool) -> str:
    where = {"expected": "expected wholly on the Neural Engine",
             "uncertain": "possibly off the Neural Engine (third-party op list only)",
             "no": "NOT expected wholly on the Neural Engine"}[on_ane]
    if not quantized:
        return f"{where}; float activations (no activation quantization)"
    what = {"throughout": "int8 activations into every int8-capable op",
            "partial": "int8 activations only in part"}[int8]
    extra = [f"{n} {rule}" for rule, n in sorted(counts.items())]
    return f"{where}; {what}" + (f" ({', '.join(extra)})" if extra else "")
