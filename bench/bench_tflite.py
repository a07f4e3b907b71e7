"""LiteRT benchmark on the reference checkpoint: float vs int8 accuracy, int8/fp32 and NCHW/NHWC latency.

Every artifact goes through the same pipeline step as `mnv4-deploy convert` (export -> load in the
interpreter -> verify -> manifest), on the same val images and with the same interpreter thread count, so
the ratios compare like with like. Prints a table and writes bench/results/tflite.json (conv_small) or
bench/results/tflite_<variant>.json (other models).

    python bench/bench_tflite.py --limit 1000        # quicker
    python bench/bench_tflite.py                     # all 5,050 shared val images
    python bench/bench_tflite.py --model mobilenetv4_hybrid_medium --layouts nchw --limit 1000
        # the 1-epoch hybrid checkpoint, full-integer int8 (Mobile MQA included); each hybrid int8
        # conversion takes minutes, so --layouts nchw skips the re-quantized NHWC pair
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
# The shared reference checkpoints (Tiny ImageNet, 202 classes, 64x64); --weights for anything else.
DEFAULT_WEIGHTS = {
    "mobilenetv4_conv_small": SHARED / "models" / "mnv4_conv_small_tin202.pth",
    "mobilenetv4_hybrid_medium": SHARED / "models" / "mnv4_hybrid_medium_tin202_e1.pth",
}
DEFAULT_DATA = SHARED / "data" / "tiny-imagenet-202"

# (label, precision, tflite options): int8 artifacts are the full-integer ones a deployer ships.
CONFIGS = [
    ("fp32 NCHW", "fp32", {"layout": "nchw"}),
    ("int8 NCHW", "int8", {"layout": "nchw", "io_dtype": "int8"}),
    ("fp32 NHWC", "fp32", {"layout": "nhwc"}),
    ("int8 NHWC", "int8", {"layout": "nhwc", "io_dtype": "int8"}),
]



def log(msg: str) -> None:
    """Progress on stderr; the table and JSON go to stdout."""
    print(msg, file=sys.stderr, flush=True)

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv4_conv_small")
    p.add_argument("--weights", type=Path, help="state_dict (default: the shared checkpoint for --model)")
    p.add_argument("--num-classes", type=int, default=202)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--calib", type=Path, default=DEFAULT_DATA / "train")
    p.add_argument("--val", type=Path, default=DEFAULT_DATA / "val")
    p.add_argument("--limit", type=int, help="evaluate on a random N val images (default: all)")
    p.add_argument("--recipe", help="recipe name or file (default: ptq-int8)")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads, the same for every artifact")
    p.add_argument("--runs", type=int, default=100, help="timed runs per artifact (batch 1)")
    p.add_argument("--layouts", default="nchw,nhwc", help="comma list of input layouts to build (nchw, nhwc)")
    p.add_argument("--out", type=Path, help="JSON report (default: bench/results/tflite[_<variant>].json)")
    args = p.parse_args()
    args.weights = args.weights or DEFAULT_WEIGHTS.get(args.model, Path("-"))
    if args.out is None:
        suffix = "" if args.model == "mobilenetv4_conv_small" else "_" + args.model.removeprefix("mobilenetv4_")
        args.out = REPO / "bench" / "results" / f"tflite{suffix}.json"
    layouts = [v.strip().lower() for v in args.layouts.split(",") if v.strip()]
    configs = [c for c in CONFIGS if c[2]["layout"] in layouts]
    if not configs:
        p.error(f"--layouts: expected nchw and/or nhwc, got {args.layouts!r}")
    if not args.weights.is_file() or not args.val.is_dir():
        print(f"skipped: reference checkpoint or val images not found ({args.weights}, {args.val})", file=sys.stderr)
        return 0

    from mnv4_deploy.config.recipes import load_recipe

    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.pipeline import ConvertSettings, EvalData, export_and_verify, load_data
    from mnv4_deploy.preparation.prepare import prepare
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.targets import ExportRequest, get_target, options_for
    from mnv4_deploy.verify.fidelity import torch_logits

    recipe = load_recipe(args.recipe)
    loaded = load_model(args.model, str(args.weights), args.num_classes,
                        {"input_size": args.input_size, "crop_pct": 1.0})
    prepare(loaded.model)
    batch = recipe.verification.batch_size
    settings = ConvertSettings(model=args.model, out=Path("."), targets="tflite", precision="int8",
                               calib=args.calib, latency_runs=args.runs, progress=False)
    cal, cal_src, _, _ = load_data(settings, loaded, recipe)
    val_set = scan_folder(args.val)
    if args.limit:
        val_set = val_set.sample(args.limit, seed=0)
    val = load_images(val_set, loaded.preprocessing)
    log(f"{len(val)} val images, {len(cal)} calibration images; quantizing")
    quantized = quantize(loaded.model, cal, recipe, cal_src)
    ev = EvalData("val", f"{args.val} ({len(val)} images)", val, torch_logits(loaded.model, val.x, batch))
    simulated = quantized.simulate(val.x, batch)

    target = get_target("tflite")
    rows: list[dict[str, Any]] = []
    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, precision, overrides) in enumerate(configs):
            opts = dataclasses.replace(options_for(recipe, "tflite"), threads=args.threads, **overrides)
            request = ExportRequest(loaded, precision, opts, quantized if precision == "int8" else None, cal)
            log(f"[{label}] converting and verifying")
            start = time.perf_counter()
            result = export_and_verify(target, request, recipe, [ev],
                                       dataclasses.replace(settings, out=Path(tmp) / str(i)),
                                       simulated if target.deploys_simulated_model(request) else None)
            m = result.manifest
            fid, lat = m["verification"]["val"]["vs_float"], m["verification"]["latency"]
            rows.append({
                "config": label, "precision": precision, "options": dataclasses.asdict(opts),
                "top1": fid["top1"], "top1_float": fid["reference_top1"], "top1_agreement": fid["top1_agreement"],
                "cosine": fid["cosine"], "sqnr_db": fid["sqnr_db"],
                "vs_pytorch_simulation": (m["verification"]["val"].get("vs_pytorch_simulation")
                                          if precision == "int8" else None),
                "latency_median_ms": lat["median_ms"], "latency_p90_ms": lat["p90_ms"],
                "size_bytes": m["artifact"]["size_bytes"], "full_integer": m["structure"]["full_integer"],
                "ops_float": m["structure"]["ops_float"],
                "estimated_macs": m["structure"]["estimated_macs"], "operators": m["structure"]["operators"],
                "export_seconds": m["export"]["seconds"], "total_seconds": round(time.perf_counter() - start, 1),
                "latency_pipeline_ms": lat["median_ms"],
            })
            runners[label] = target.load(result.path, request)
        # Latency again, interleaved: one run of each artifact per round, so background load on a shared
        # machine hits every configuration alike and the ratios stay meaningful.
        for label, ms_ in interleaved_latency(runners, val.x[:1], args.runs).items():
            by_label = next(r for r in rows if r["config"] == label)
            by_label["latency_median_ms"], by_label["latency_p90_ms"] = ms_

    by = {r["config"]: r for r in rows}
    ms = lambda k: by[k]["latency_median_ms"]
    ratios = {}
    for layout in ("NCHW", "NHWC"):
        if f"int8 {layout}" in by:
            ratios[f"int8/fp32 latency, {layout}"] = round(ms(f"int8 {layout}") / ms(f"fp32 {layout}"), 3)
    for precision in ("fp32", "int8"):
        if f"{precision} NHWC" in by and f"{precision} NCHW" in by:
            ratios[f"NHWC/NCHW latency, {precision}"] = round(ms(f"{precision} NHWC") / ms(f"{precision} NCHW"), 3)
    first_int8 = next(r for r in rows if r["precision"] == "int8")
    ratios[f"int8 - float top-1 (points), {first_int8['config'].split()[-1]}"] = round(
        100 * (first_int8["top1"] - first_int8["top1_float"]), 2)
    report = {
        "model": loaded.describe(), "val_images": len(val), "calibration": quantized.calibration,
        "recipe": recipe.name, "threads": args.threads, "latency_runs": args.runs, "rows": rows, "ratios": ratios,
        "note": ("latency: batch 1, interleaved rounds (latency_pipeline_ms: the pipeline's own sequential "
                 "measurement) on a shared CPU: compare ratios, not absolute numbers"),
    }
    print(table(rows))
    for k, v in ratios.items():
        print(f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def interleaved_latency(runners: dict[str, Any], x: Any, runs: int, warmup: int = 10) -> dict[str, tuple[float, float]]:
    """Median and p90 milliseconds per runner, timing the runners in turn within each round."""
    import statistics

    for runner in runners.values():
        for _ in range(warmup):
            runner(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for label, runner in runners.items():
            t0 = time.perf_counter()
            runner(x)
            times[label].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for label, ts in times.items():
        ts.sort()
        out[label] = (round(statistics.median(ts), 4), round(ts[int(0.9 * (len(ts) - 1))], 4))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    header = ("config", "size MB", "top1", "top1 float", "agree", "cosine", "full int", "median ms", "p90 ms",
              "export s")
    cells = [(r["config"], f"{r['size_bytes'] / 1e6:.2f}", f"{100 * r['top1']:.2f}%", f"{100 * r['top1_float']:.2f}%",
              f"{100 * r['top1_agreement']:.2f}%", f"{r['cosine']:.4f}", "yes" if r["full_integer"] else "no",
              f"{r['latency_median_ms']:.3f}", f"{r['latency_p90_ms']:.3f}", f"{r['export_seconds']:.0f}")
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in cells])


if __name__ == "__main__":
    sys.exit(main())
