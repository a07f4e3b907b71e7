"""Our W8A8 CoreML program (PT2E scales -> MIL quantize/dequantize) vs what coremltools' own activation
quantization (`coremltools.optimize.coreml.linear_quantize_activations` + `linear_quantize_weights`) makes of
the float program of the same model, op by op; and the Neural Engine fit check (targets/coreml/mlprogram/ane.py)
of both.

linear_quantize_activations calibrates by running the float model (`predict` through its ModelDebugger), which
Core ML only does on macOS: on Linux this script first calls it and records the exact error, then applies the
same graph passes it would apply (insert_prefix_/insert_suffix_quantize_dequantize_pair,
dequantize_quantize_pair_elimination, then linear_quantize_weights) with placeholder ranges ([-1, 1] for every
tensor). Where quantize/dequantize go, their dtype and granularity do not depend on the ranges, so the structure
is what coremltools would produce; its scales are NOT (say so wherever they are shown).

Make the two programs with the project's CLI first, e.g.
  mnv4-deploy convert --model mobilenetv4_conv_small --weights CKPT --num-classes 202 --input-size 64 \
      --crop-pct 1.0 --to coreml --int8 --out /tmp/ane/cs_int8 --no-verify-gate
  mnv4-deploy convert ... --precision fp16 --out /tmp/ane/cs_fp16
then
  python bench/coreml_ane_compare.py --ours /tmp/ane/cs_int8/coreml/model.mlpackage \
      --float /tmp/ane/cs_fp16/coreml/model.mlpackage [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import difflib
import logging
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnv4_deploy.infra.fileio import write_json  # noqa: E402
from mnv4_deploy.targets.coreml.mlprogram.ane import check_program  # noqa: E402

logger = logging.getLogger("coreml_ane_compare")
QDQ = ("quantize", "dequantize")
SKIP = ("const", "cast")
LINUX_PREDICT_ERROR = "Model prediction is only supported on macOS"


# ---------------------------------------------------------------- coremltools' own activation quantization
def coremltools_w8a8(float_path: Path, images: Optional[np.ndarray]) -> tuple[Any, str]:
    """(spec of coremltools' W8A8 program, how it was made): the real API where it runs, else its passes with
    ranges from the project's ML Program executor on `images` (or placeholders without images)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    model = ct.models.MLModel(str(float_path), skip_model_load=True)
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
    shape = tuple(model.get_spec().description.input[0].type.multiArrayType.shape)
    samples = ([{None: x[None]} for x in images] if images is not None else
               [{None: np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(2)])
    try:
        a8 = cto.linear_quantize_activations(model, config, samples)
        how = "coremltools.optimize.coreml.linear_quantize_activations (ran)"
    except Exception as exc:  # coremltools raises a bare Exception for predict off macOS: match its message
        if LINUX_PREDICT_ERROR not in str(exc):
            raise
        how = (f"linear_quantize_activations cannot calibrate here: {type(exc).__name__}: {exc} "
               f"({platform.system()}; it runs the model through ModelDebugger.step -> MLModel.predict). "
               "Its graph passes applied instead, with ")
        if images is None:
            how += "placeholder ranges [-1, 1]: structure is coremltools', scales are not"
            a8 = _passes_with_ranges(model, config, None)
        else:
            how += (f"min/max ranges of {len(images)} images run through the float program by the project's ML "
                    "Program executor (mnv4_deploy.targets.coreml.mlprogram; 'executed', not Core ML)")
            a8 = _passes_with_ranges(model, config, _executor_ranges(float_path, images))
    w8a8 = cto.linear_quantize_weights(a8, cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric")))
    return w8a8.get_spec(), how


def _executor_ranges(float_path: Path, images: np.ndarray) -> dict[str, dict[str, float]]:
    """{tensor: {rmin, rmax}} over `images` for every op output, as coremltools' ModelDebugger collects them."""
    from mnv4_deploy.targets.coreml import mlprogram

    executor = mlprogram.load(float_path)
    names = [n for n in executor.program.types if n not in executor.consts]
    values = executor.run({executor.input_names[0]: images}, outputs=names)
    stats = {n: {"rmin": float(np.min(v)), "rmax": float(np.max(v))} for n, v in values.items()}
    stats[executor.input_names[0]] = {"rmin": float(images.min()), "rmax": float(images.max())}
    return stats


def _passes_with_ranges(model: Any, config: Any, ranges: Optional[dict[str, dict[str, float]]]) -> Any:
    """linear_quantize_activations' body (coremltools optimize/coreml/_post_training_quantization.py) minus
    its calibration: the passes it applies, in its order, with the given ranges (None: [-1, 1] everywhere)."""
    from coremltools import _SPECIFICATION_VERSION_IOS_17
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    names = {i.name for i in model.get_spec().description.input}
    fn = model.get_spec().mlProgram.functions["main"]
    for op in fn.block_specializations[fn.opset].operations:
        names.update(o.name for o in op.outputs)
    stats = {n: {"rmin": -1.0, "rmax": 1.0} for n in names} | (ranges or {})
    passes = []
    for name in ("compression::insert_prefix_quantize_dequantize_pair",
                 "compression::insert_suffix_quantize_dequantize_pair"):
        p = PASS_REGISTRY[name]
        p.set_options([PassOption("config", config), PassOption("activation_stats", stats)])
        passes.append(p)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    return _apply_graph_pass(model, passes, spec_version=_SPECIFICATION_VERSION_IOS_17,
                             pymil_load_func=milproto_load.load, skip_model_load=True)


# ---------------------------------------------------------------- per-op description
def describe_ops(spec: Any) -> list[dict[str, Any]]:
    """Each compute op in program order with how its activation input, output and weight are quantized."""
    from coremltools.proto import MIL_pb2

    fn = spec.mlProgram.functions["main"]
    ops = list(fn.block_specializations[fn.opset].operations)
    producer = {o.name: op for op in ops for o in op.outputs}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for op in ops:
        for arg in op.inputs.values():
            for a in arg.arguments:
                consumers[a.name].append(op)

    def arg(op: Any, key: str) -> Optional[str]:
        return op.inputs[key].arguments[0].name if key in op.inputs and op.inputs[key].arguments else None

    def const_shape(name: Optional[str]) -> tuple[int, ...]:
        op = producer.get(name) if name else None
        return tuple(d.constant.size for d in op.outputs[0].type.tensorType.dimensions) if op is not None else ()

    def quant(q: Any) -> str:
        dtype = MIL_pb2.DataType.Name(q.outputs[0].type.tensorType.dataType).lower()
        scale = const_shape(arg(q, "scale"))
        gran = "per-channel" if int(np.prod(scale)) > 1 else "per-tensor"
        zp = "zp" if arg(q, "zero_point") else "sym"
        return f"{dtype} {gran} {zp}"

    def scale_of(q: Any) -> Optional[float]:
        """A per-tensor scale stored inline (fp16 bytes or fp32 floats); None otherwise."""
        op = producer.get(arg(q, "scale"))
        if op is None or op.type != "const":
            return None
        t = op.attributes["val"].immediateValue.tensor
        kind = t.WhichOneof("value")
        if kind == "bytes" and len(t.bytes.values) == 2:
            return float(np.frombuffer(t.bytes.values, np.float16)[0])
        if kind == "floats" and len(t.floats.values) == 1:
            return float(t.floats.values[0])
        return None

    def input_quantize(name: Optional[str]) -> Optional[Any]:
        op = producer.get(name) if name else None
        while op is not None and op.type == "reshape":
            op = producer.get(arg(op, "x"))
        if op is not None and op.type == "dequantize":
            op = producer.get(arg(op, "input"))
            while op is not None and op.type == "reshape":
                op = producer.get(arg(op, "x"))
        return op if op is not None and op.type == "quantize" else None

    def input_q(name: Optional[str]) -> str:
        op = producer.get(name) if name else None
        while op is not None and op.type in ("reshape",):  # our program moves a flatten inside the int8 pair
            op = producer.get(arg(op, "x"))
        if op is not None and (op.type == "const" or op.type.startswith("constexpr_")):
            return "const"
        if op is not None and op.type == "quantize":  # an int8 tensor fed straight in (a reshape of int8)
            return quant(op) + " (int8 tensor)"
        if op is None or op.type != "dequantize":
            return "float"
        src = producer.get(arg(op, "input"))
        while src is not None and src.type == "reshape":
            src = producer.get(arg(src, "x"))
        return quant(src) if src is not None and src.type == "quantize" else "dequantized const"

    def output_q(op: Any) -> str:
        if MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType).lower() in ("int8", "uint8"):
            return "int8 tensor out"  # a reshape between quantize and dequantize
        outs = consumers.get(op.outputs[0].name, [])
        qs = [c for c in outs if c.type == "quantize"]
        return quant(qs[0]) if qs else "float"

    def weight(op: Any) -> str:
        key = {"conv": "weight", "linear": "weight", "matmul": "y"}.get(op.type)
        w = producer.get(arg(op, key)) if key and arg(op, key) else None
        if w is None:
            return "-"
        if w.type.startswith("constexpr_"):
            data = w.attributes.get("quantized_data")
            dtype = MIL_pb2.DataType.Name(data.type.tensorType.dataType).lower() if data is not None else "?"
            scale = w.attributes.get("scale")
            n = int(np.prod([d.constant.size for d in scale.type.tensorType.dimensions])) if scale is not None else 0
            return f"{dtype} {'per-channel' if n > 1 else 'per-tensor'}"
        if w.type == "const":
            return MIL_pb2.DataType.Name(w.outputs[0].type.tensorType.dataType).lower() + " const"
        return "activation"

    out = []
    for op in ops:
        if op.type in SKIP or op.type in QDQ or op.type.startswith("constexpr_"):
            continue
        keys = ("x", "y") if op.type in ("add", "mul", "matmul") else ("x",)
        inputs = [n for k in keys if (n := arg(op, k))]
        q = input_quantize(inputs[0]) if inputs else None
        out.append({"type": op.type, "name": op.outputs[0].name,
                    "in": " / ".join(input_q(n) for n in inputs) or "-",
                    "out": output_q(op), "weight": weight(op),
                    "in_scale": scale_of(q) if q is not None else None,
                    "in_dtype": MIL_pb2.DataType.Name(q.outputs[0].type.tensorType.dataType).lower() if q else None})
    return out


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Align the two op sequences by op type and list the ops that differ in any column."""
    rows = []
    sm = difflib.SequenceMatcher(a=[o["type"] for o in ours], b=[o["type"] for o in theirs], autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            for a, b in zip(ours[i1:i2], theirs[j1:j2], strict=True):
                diff = [k for k in ("in", "out", "weight") if a[k] != b[k]]
                if diff:
                    rows.append({"op": a["type"], "ours_name": a["name"], "differs": diff,
                                 "ours": {k: a[k] for k in diff}, "coremltools": {k: b[k] for k in diff}})
        else:
            rows.append({"op": "/".join(sorted({o["type"] for o in ours[i1:i2] + theirs[j1:j2]})),
                         "ours_name": ",".join(o["name"] for o in ours[i1:i2]), "differs": ["op sequence"],
                         "ours": [o["type"] for o in ours[i1:i2]], "coremltools": [o["type"] for o in theirs[j1:j2]]})
    return rows


def scale_ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ours / coremltools' input scale of each aligned op, grouped by our input dtype: how much finer (< 1) or
    coarser our int8 steps are. Only meaningful when coremltools' ranges came from real images (--calib)."""
    sm = difflib.SequenceMatcher(a=[o["type"] for o in ours], b=[o["type"] for o in theirs], autojunk=False)
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag != "equal":
            continue
        for a, b in zip(ours[i1:i2], theirs[j1:j2], strict=True):
            if a["in_scale"] and b["in_scale"]:
                groups[f"{a['type']} ({a['in_dtype']} ours)"].append(a["in_scale"] / b["in_scale"])
    return {k: {"ops": len(v), "median": round(float(np.median(v)), 3), "min": round(min(v), 3),
                "max": round(max(v), 3)} for k, v in sorted(groups.items())}


def kinds(rows: list[dict[str, Any]]) -> collections.Counter:
    """Differences grouped by (op, column, ours -> coremltools) so a 46-conv model prints a short table."""
    c: collections.Counter = collections.Counter()
    for r in rows:
        if r["differs"] == ["op sequence"]:
            c[(r["op"], "op sequence", f"{r['ours']} -> {r['coremltools']}")] += 1
            continue
        for k in r["differs"]:
            c[(r["op"], k, f"{r['ours'][k]} -> {r['coremltools'][k]}")] += 1
    return c


def _images(folder: Optional[Path], n: int, spec: Any) -> Optional[np.ndarray]:
    """`n` images of `folder` preprocessed for the program's input (ImageNet mean/std, no crop, as the project's
    reference checkpoints are evaluated)."""
    if folder is None:
        return None
    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.load.preprocessing import Preprocessing

    h, w = spec.description.input[0].type.multiArrayType.shape[2:]
    return load_images(scan_folder(folder).sample(n, 0), Preprocessing(input_size=(h, w), crop_pct=1.0)).x


def main(argv: Optional[list[str]] = None) -> int:
    import coremltools as ct

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", type=Path, required=True, help="our W8A8 .mlpackage")
    ap.add_argument("--float", type=Path, required=True, help="the fp16 (or fp32) .mlpackage of the same model")
    ap.add_argument("--calib", type=Path, help="image folder: calibrate coremltools' quantization on these images "
                    "(off macOS through the project's ML Program executor); default: placeholder ranges")
    ap.add_argument("--images", type=int, default=32, help="images taken from --calib (seeded)")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("coremltools").setLevel(logging.WARNING)  # one 'Removing op' line per folded constant

    ours_spec = ct.utils.load_spec(str(args.ours))
    theirs_spec, how = coremltools_w8a8(args.float, _images(args.calib, args.images, ours_spec))
    logger.info(f"coremltools W8A8: {how}")
    ours, theirs = describe_ops(ours_spec), describe_ops(theirs_spec)
    rows = compare(ours, theirs)
    table = kinds(rows)
    logger.info(f"\n{len(ours)} compute ops ours, {len(theirs)} coremltools'; {len(rows)} differ")
    logger.info(f"{'op':12} {'column':12} {'count':>5}  ours -> coremltools")
    for (op, col, change), n in sorted(table.items(), key=lambda kv: (-kv[1], kv[0])):
        logger.info(f"{op:12} {col:12} {n:5d}  {change}")
    ratios = scale_ratios(ours, theirs)
    if args.calib is not None:
        logger.info("\ninput scale, ours / coremltools' (both calibrated, on different images and observers)")
        for group, r in ratios.items():
            logger.info(f"  {group:28} {r['ops']:3d} ops  median {r['median']}  [{r['min']}, {r['max']}]")
    fit = {"ours": check_program(ours_spec)["summary"], "coremltools": check_program(theirs_spec)["summary"]}
    for who, s in fit.items():
        logger.info(f"\nNeural Engine fit, {who}: {s['verdict']}; activation dtypes {s['activation_dtypes']}, "
                    f"{s['asymmetric_activations']} asymmetric, {s['quantize_ops']} quantize ops, "
                    f"{s['int8_compute_ops']} int8 compute ops")
    if args.json:
        write_json(args.json, {"coremltools_method": how, "ours_ops": len(ours), "coremltools_ops": len(theirs),
                               "differences": [{"op": op, "column": col, "change": ch, "count": n}
                                               for (op, col, ch), n in table.items()],
                               "input_scale_ratios": ratios if args.calib is not None else None,
                               "rows": rows, "fit": fit})
    return 0


if __name__ == "__main__":
    sys.exit(main())
