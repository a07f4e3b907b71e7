"""int8 accuracy per recipe and target on the reference checkpoint, measured in each target's runtime, next to
the naive baselines (each tool's own default int8 quantization).

For mobilenetv4_conv_small (../shared/models/mnv4_conv_small_tin202.pth, 202 classes, 64x64 input, crop_pct
1.0), calibrated on Tiny ImageNet train (the recipe's `calibration.images`, seed) and judged on the labelled
val images (all 5,050 by default; --val-limit N takes a fixed seed-0 sample). Everything goes through the real
pipeline, `mnv4_deploy.pipeline.convert` (precision int8): one call per recipe with all its targets, so the
float logits are computed once and the PyTorch-side PT2E quantization is shared by every target of that recipe.
Each row is read back from the manifest that convert wrote (`verification.val.vs_float`):

  top-1       int8 top-1 on the val images, run in the target's runtime (onnxruntime, LiteRT, OpenVINO CPU);
              CoreML on Linux: this project's ML Program executor runs the saved program ("executed");
              qnn: onnxruntime-qnn's HTP emulator ("emulated")
  float       the float PyTorch model's top-1 on the same images
  drop pts    float minus int8, in percentage points
  agreement   share of images whose int8 top-1 class equals float's
  SQNR dB     logit signal-to-quantization-noise ratio against float
  quantize s  the recipe's quantization time (manifest quantization.seconds: calibration + PTQ algorithms;
              NNCF: nncf.quantize; onnxruntime: inside export s; QAT: the whole training run)
  export s    seconds in the target's export (conversion; for ort-baseline also quantize_static)
  latency ms  median batch-1 latency in the runtime, default threads (--latency-runs calls; one run's rows are
              comparable with each other, not with other runs); only real runtimes are timed ("not timed"
              for executed / emulated numbers)

Rows:
  - with --with-float: the float model per target (agreement 100% by definition; the latency reference)
  - each PTQ recipe (--recipes, default ptq-int8) x each target (--targets, default onnx,tflite,openvino,coreml)
  - baselines (--baselines, default all three; 'none' to skip):
      ort-baseline   onnx:     the shipped ort-baseline recipe = onnxruntime.quantization.quantize_static with
                               its defaults (QDQ, QInt8 activations and weights, per-tensor, MinMax calibration)
                               on the float ONNX, 512 calibration images
      nncf-defaults  openvino: nncf.quantize with its defaults (preset None -> performance for CNNs,
                               fast_bias_correction True, subset_size 300: 300 calibration images) on the float
                               IR; the pipeline passes target_device CPU (NNCF's default is ANY)
      litert-pt2e-defaults tflite: litert-torch's get_symmetric_quantization_config() defaults: int8 weights
                               per-tensor symmetric (MinMax), int8 activations per-tensor affine (HistogramObserver),
                               no equalization / bias correction, 512 calibration images
  - QAT runs (--qat-manifests DIR): DIR/<target>/manifest.json written by `mnv4-deploy qat` (quantization.method
    'qat'), labelled with the run's recipe name; quantize s = the QAT run's seconds. Their val set is whatever that run used:
    the 'val images' column says how many (compare rows only at equal counts).

The PT2E quantization runs in every convert call, also for the onnxruntime and NNCF baselines, which ignore it
(its time is not counted for them). Prints a markdown table and writes JSON (bench/results/targets.json).
Slow: at 2 CPU cores the full run (5,050 val images, 4 targets, 3 baselines) takes tens of minutes; try
--val-limit 100 --targets onnx --baselines none first.

  /work/venv/bin/python bench/bench_targets.py                                   # everything, all val images
  /work/venv/bin/python bench/bench_targets.py --val-limit 100 --targets onnx --baselines none   # quick check
  /work/venv/bin/python bench/bench_targets.py --recipes ptq-int8 ptq-int8-edgetpu --baselines nncf-defaults
  /work/venv/bin/python bench/bench_targets.py --recipes --baselines none --qat-manifests build/qat  # QAT rows only
  /work/venv/bin/python bench/bench_targets.py --recipes ptq-int8 ptq-int8-mixed --baselines none --with-float \
      --latency-runs 300          # mixed precision: accuracy and latency against pure int8 and float
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "models" / "mnv4_conv_small_tin202.pth"
DATA = SHARED / "data" / "tiny-imagenet-202"
ALL_TARGETS = ("onnx", "tflite", "openvino", "coreml")

# name -> (target, recipe: shipped name or YAML text, what it is)
BASELINES: dict[str, tuple[str, str, str]] = {
    "ort-baseline": (
        "onnx", "ort-baseline",
        "onnxruntime quantize_static defaults (QDQ, int8 act+weights, per-tensor, MinMax), 512 calib images"),
    "nncf-defaults": (
        "openvino",
        ("name: nncf-defaults\n"
        "description: nncf.quantize defaults on the float IR (baseline)\n"
        "quantization:\n  calibration: {images: 300}\n"  # NNCF's default subset_size
        "targets:\n  openvino: {method: nncf, preset: performance, fast_bias_correction: true}\n"),
        "nncf.quantize defaults (performance preset, fast bias correction, 300 calib images; target_device CPU)"),
    "litert-pt2e-defaults": (
        "tflite",
        ("name: litert-pt2e-defaults\n"
        "description: litert-torch get_symmetric_quantization_config() defaults (baseline)\n"
        "quantization:\n  weights: {granularity: per_tensor}\n  activations: {observer: histogram}\n"),
        "litert-torch default PT2E config: per-tensor sym. MinMax weights, HistogramObserver act., 512 calib images"),
}


@contextlib.contextmanager
def _timed_exports(times: dict[str, float]) -> Iterator[None]:
    """Record the seconds each target's export() takes (the manifests carry no export time for every target)."""
    from mnv4_deploy.targets import get_target

    classes = {name: type(get_target(name)) for name in ALL_TARGETS}
    originals = {name: cls.__dict__.get("export") for name, cls in classes.items()}

    def wrap(name: str, fn: Any) -> Any:
        def export(self: Any, request: Any, path: Path) -> Any:
            start = time.perf_counter()
            try:
                return fn(self, request, path)
            finally:
                times[name] = round(time.perf_counter() - start, 2)
        return export

    for name, cls in classes.items():
        cls.export = wrap(name, cls.export)
    try:
        yield
    finally:
        for name, cls in classes.items():
            if originals[name] is None:
                delattr(cls, "export")
            else:
                cls.export = originals[name]


def _convert(args: argparse.Namespace, recipe: str, targets: str, out: Path,
             precision: str = "int8") -> tuple[list[Any], dict, dict, float]:
    from mnv4_deploy.pipeline import ConvertSettings, convert

    settings = ConvertSettings(
        model="mobilenetv4_conv_small", out=out, targets=targets, precision=precision, weights=str(args.weights),
        num_classes=202, preprocessing={"input_size": [64, 64], "crop_pct": 1.0}, calib=args.calib, val=args.val,
        val_limit=args.val_limit or None, recipe=recipe, latency_runs=args.latency_runs, progress=False,
        workers=args.workers, verify_gate=False)  # baselines may fail the gate: measure them anyway
    errors: dict[str, str] = {}
    export_s: dict[str, float] = {}
    start = time.perf_counter()
    with _timed_exports(export_s):
        results = convert(settings, on_target_error=lambda t, e: errors.__setitem__(t, f"{type(e).__name__}: {e}"))
    return results, export_s, errors, round(time.perf_counter() - start, 1)


def _row(manifest: dict[str, Any], recipe: str, method: str, quantize_s: float | None,
         export_s: float | None, note: str = "") -> dict[str, Any]:
    ver = manifest.get("verification", {})
    entry = ver.get("val") or ver.get("held_back") or {}
    f = entry.get("vs_float", {})
    top1, ref = f.get("top1"), f.get("reference_top1")
    return {
        "target": manifest.get("target"), "recipe": recipe, "method": method,
        "top1": top1, "float_top1": ref,
        "drop_pts": None if top1 is None or ref is None else round(100 * (ref - top1), 2),
        "agreement": f.get("top1_agreement"), "sqnr_db": f.get("sqnr_db"),
        "quantize_s": quantize_s, "export_s": export_s, "numbers": ver.get("numbers"),
        "eval_set": "val" if "val" in ver else "held_back", "val_images": f.get("images"),
        "vs_pytorch_simulation": (ver.get("held_back") or {}).get("vs_pytorch_simulation", {}).get("top1_agreement"),
        "latency_ms": (ver.get("latency") or {}).get("median_ms"),
        "note": note,
    }


def _recipe_rows(args: argparse.Namespace, recipe: str, targets: str, tmp: Path, name: str = "",
                 method: str = "", precision: str = "int8") -> list[dict[str, Any]]:
    results, export_s, errors, wall = _convert(args, recipe, targets, tmp / (name or recipe), precision)
    rows = []
    for r in results:
        m = r.manifest
        q = m.get("quantization") or {}
        exp = m.get("export") or {}
        quantize_s, note = q.get("seconds"), ""
        if precision != "int8":
            quantize_s, note = None, "float reference for the latency column"
        elif name == "nncf-defaults":
            quantize_s, note = (exp.get("nncf") or {}).get("seconds"), "shared PT2E quantization unused"
        elif name == "ort-baseline":
            quantize_s, note = None, "quantize_static time is in export s; shared PT2E quantization unused"
        rows.append(_row(m, name or recipe, method or _method(m), quantize_s, export_s.get(r.target), note)
                    | {"convert_wall_s": wall})
    for target, err in errors.items():
        rows.append({"target": target, "recipe": name or recipe, "method": method, "error": err})
    return rows


def _method(manifest: dict[str, Any]) -> str:
    q = manifest.get("quantization") or {}
    algos = ", ".join(q.get("algorithms", {})) or "no PTQ algorithms"
    method = f"{q.get('weights', '?')} weights, {q.get('activations', '?')}; {algos}"
    fallback = q.get("fallback")
    if fallback:
        method += f"; {len(fallback['sites'])} activations {fallback.get('precision_here', fallback['precision'])}"
    return method


def qat_rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob("*/manifest.json")):
        m = json.loads(path.read_text())
        q = m.get("quantization") or {}
        if q.get("method") != "qat":
            print(f"note: {path} is not a QAT manifest (quantization.method={q.get('method')!r}); skipped",
                  file=sys.stderr)
            continue
        info = q.get("qat") or {}
        history = info.get("history") or []
        method = (f"QAT + distillation from float, {info.get('epochs', '?')} epoch(s), {info.get('steps', '?')} steps "
                  f"on {info.get('device', '?')}")
        if q.get("fallback"):
            method += f"; {len(q['fallback']['sites'])} activations float"
        recipe = (m.get("recipe") or {}).get("name") or "qat"
        rows.append(_row(m, recipe, method, q.get("seconds"), None, f"from {path}")
                    | {"qat_history": history})
    if not rows:
        print(f"note: no QAT manifests (OUT/<target>/manifest.json, method 'qat') under {folder}", file=sys.stderr)
    return rows


def _fmt(v: Any, pct: bool = False, nd: int = 2) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.{nd}f}%" if pct else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(result: dict[str, Any]) -> str:
    title = (f"mobilenetv4_conv_small (mnv4_conv_small_tin202.pth), int8, {result['val_images']} Tiny ImageNet val "
             f"images; measured in each target's runtime (CoreML on Linux: executed by the ML Program executor)")
    lines = [title, "",
             "| target | recipe/method | top-1 | float | drop pts | agreement | SQNR dB | quantize s | export s | "
             "latency ms | numbers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        label = f"{r['recipe']}: {r['method']}" if r.get("method") else r["recipe"]
        if "error" in r:
            lines.append(f"| {r['target']} | {label} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        numbers = r.get("numbers") or "-"
        if r.get("eval_set") != "val":
            numbers += " (held-back images, no val)"
        elif r.get("val_images") != result["val_images"]:
            numbers += f" ({r['val_images']} val images)"
        lines.append(f"| {r['target']} | {label} | {_fmt(r['top1'], True)} | {_fmt(r['float_top1'], True)} | "
                     f"{_fmt(r['drop_pts'])} | {_fmt(r['agreement'], True, 1)} | {_fmt(r['sqnr_db'])} | "
                     f"{_fmt(r['quantize_s'], nd=1)} | {_fmt(r['export_s'], nd=1)} | "
                     f"{_fmt(r.get('latency_ms'))} | {numbers} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=["ptq-int8"],
                    help="PTQ recipes (shipped names or YAML paths) to run on every --targets; default ptq-int8; "
                         "give the flag with no names for none")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list for the recipe rows (default all four)")
    ap.add_argument("--baselines", nargs="*", default=list(BASELINES),
                    help=f"baselines to run: {', '.join(BASELINES)} (default all), or 'none'")
    ap.add_argument("--qat-manifests", type=Path, default=None,
                    help="folder written by `mnv4-deploy qat --out DIR`: adds DIR/<target>/manifest.json rows")
    ap.add_argument("--val-limit", type=int, default=0, help="fixed seed-0 sample of N val images (default: all 5,050)")
    ap.add_argument("--latency-runs", type=int, default=5,
                    help="timed batch-1 calls per artifact (median in the table; real runtimes only)")
    ap.add_argument("--with-float", action="store_true",
                    help="also export and time the float model per target (a latency reference in the same run)")
    ap.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    ap.add_argument("--weights", type=Path, default=CHECKPOINT)
    ap.add_argument("--calib", type=Path, default=DATA / "train")
    ap.add_argument("--val", type=Path, default=DATA / "val")
    ap.add_argument("--keep", type=Path, default=None, help="write the artifacts here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "targets.json")
    args = ap.parse_args(argv)
    baselines = [] if args.baselines in (["none"], []) else args.baselines
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        ap.error(f"unknown baseline(s) {', '.join(unknown)}: choose from {', '.join(BASELINES)}")
    if not args.weights.is_file() or not args.val.is_dir() or not args.calib.is_dir():
        print(f"reference checkpoint or data not found ({args.weights}, {args.calib}, {args.val})", file=sys.stderr)
        return 2

    from mnv4_deploy.infra.fileio import write_json

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_targets.") as tmp_name:
        tmp = args.keep or Path(tmp_name)
        if args.with_float:
            rows += _recipe_rows(args, "ptq-int8", args.targets, tmp, "fp32", "float model", precision="fp32")
        for recipe in args.recipes:
            rows += _recipe_rows(args, recipe, args.targets, tmp)
        for name in baselines:
            target, recipe, method = BASELINES[name]
            if "\n" in recipe:
                path = Path(tmp_name) / f"{name}.yaml"
                path.write_text(recipe)
                recipe = str(path)
            rows += _recipe_rows(args, recipe, target, tmp, name, method)
    if args.qat_manifests:
        rows += qat_rows(args.qat_manifests)
    counts = [r["val_images"] for r in rows if r.get("eval_set") == "val" and r.get("val_images")]
    result = {
        "model": "mobilenetv4_conv_small", "checkpoint": args.weights.name,
        "val_images": args.val_limit or (counts[0] if counts else None),
        "calibration": f"{args.calib} (each recipe's calibration.images, seed)",
        "baselines": {n: {"target": BASELINES[n][0], "what": BASELINES[n][2]} for n in baselines},
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }
    if not args.val_limit and counts:
        result["val_images"] = max(set(counts), key=counts.count)
    write_json(args.out, result)
    print(table(result))
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
