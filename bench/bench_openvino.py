"""OpenVINO benchmark on the reference checkpoint: float vs int8 (PT2E and NNCF) accuracy, and int8/fp32 speed.

Uses the pipeline's own pieces (load, prepare, quantize once, export_and_verify) so the numbers are the ones
`mnv4-deploy convert --to openvino` would write into manifests. Latency is batch 1 with the LATENCY hint;
throughput uses the plugin's optimal number of parallel requests with each hint.

    /work/venv/bin/python bench/bench_openvino.py --limit 2000
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEFAULT_WEIGHTS = SHARED / "models" / "mnv4_conv_small_tin202.pth"
DEFAULT_DATA = SHARED / "data" / "tiny-imagenet-202"



def log(msg: str) -> None:
    """Progress on stderr; the table and JSON go to stdout."""
    print(msg, file=sys.stderr, flush=True)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv4_conv_small")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--num-classes", type=int, default=202)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--calib", type=Path, default=DEFAULT_DATA / "train")
    p.add_argument("--val", type=Path, default=DEFAULT_DATA / "val")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a random N of the val images (default: all)")
    p.add_argument("--recipe", default=None, help="recipe for the shared PT2E quantization (default ptq-int8)")
    p.add_argument("--latency-runs", type=int, default=100, help="timed batch-1 calls per variant and round")
    p.add_argument("--throughput-seconds", type=float, default=2.0, help="per variant and round")
    p.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS for the speed runs (0 = runtime default)")
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds (median reported)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "openvino.json")
    args = p.parse_args(argv)

    if not Path(args.weights).is_file() or not args.val.is_dir():
        print(f"skipped: reference checkpoint or data not found ({args.weights}, {args.val})", file=sys.stderr)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_openvino.") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, out: Path) -> int:
    """Build fp32 and both int8 artifacts under `out`, measure them, print the table and write the JSON."""
    from mnv4_deploy.config.recipes import load_recipe
    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.pipeline import ConvertSettings, EvalData, export_and_verify, load_data
    from mnv4_deploy.preparation.prepare import prepare
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.targets import ExportRequest, get_target, options_for
    from mnv4_deploy.targets.openvino.target import OpenVinoRunner
    from mnv4_deploy.verify.fidelity import torch_logits
    from mnv4_deploy.verify.latency import measure_latency

    started = time.perf_counter()
    pre = {"input_size": [args.input_size, args.input_size], "crop_pct": 1.0}
    settings = ConvertSettings(model=args.model, out=out, targets="openvino", precision="int8", weights=args.weights,
                               num_classes=args.num_classes, preprocessing=pre, calib=args.calib, val=args.val,
                               val_limit=args.limit, recipe=args.recipe, progress=False, latency_runs=30,
                               verify_gate=False)  # measure every method, including those the gate would refuse
    recipe = load_recipe(args.recipe)
    target = get_target("openvino")
    loaded = load_model(settings.model, settings.weights, settings.num_classes, settings.preprocessing)
    prepare(loaded.model)
    cal, cal_src, ver, ver_src = load_data(settings, loaded, recipe)
    val_set = scan_folder(args.val)
    if args.limit:
        val_set = val_set.sample(args.limit, seed=0)
    val = load_images(val_set, loaded.preprocessing)
    batch = recipe.verification.batch_size
    evals = [EvalData("held_back", ver_src, ver, torch_logits(loaded.model, ver.x, batch)),
             EvalData("val", f"{args.val} ({len(val)} images)", val, torch_logits(loaded.model, val.x, batch))]
    log(f"quantizing (pt2e, recipe {recipe.name}) on {cal_src}")
    quantized = quantize(loaded.model, cal, recipe, cal_src)
    simulated = quantized.simulate(evals[0].images.x, batch)

    base = options_for(recipe, "openvino")
    variants = {
        "fp32": ("fp32", base),
        "int8 pt2e": ("int8", dataclasses.replace(base, method="pt2e")),
        "int8 nncf": ("int8", dataclasses.replace(base, method="nncf")),
    }
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Any] = {}
    for name, (precision, options) in variants.items():
        log(f"[openvino] {name}")
        t0 = time.perf_counter()
        request = ExportRequest(loaded, precision, options, quantized if precision == "int8" else None, cal)
        result = export_and_verify(target, request, recipe, evals,
                                   dataclasses.replace(settings, out=out / name.replace(" ", "_")),
                                   simulated if target.deploys_simulated_model(request) else None)
        v = result.manifest["verification"]["val"]
        row: dict[str, Any] = {
            "precision": precision, "method": result.manifest["export"]["method"],
            "export_and_verify_s": round(time.perf_counter() - t0, 1),
            "size_mb": round(result.manifest["artifact"]["size_bytes"] / 1e6, 3),
            "val": v, "held_back": result.manifest["verification"]["held_back"],
            "runtime": result.manifest["structure"]["runtime"],
        }
        rows[name] = row
        paths[name] = (result.path, options)

    # Speed: variants measured in alternating rounds, so load from other processes on a shared machine hits
    # fp32 and int8 alike; each number is the median over rounds.
    x1 = val.x[:1]
    for hint in ("latency", "throughput"):
        runners = {name: OpenVinoRunner(path, dataclasses.replace(opts, performance_hint=hint, threads=args.threads))
                   for name, (path, opts) in paths.items()}
        lat: dict[str, list[float]] = {name: [] for name in runners}
        thr: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                lat[name].append(measure_latency(runner, x1, warmup=10, runs=args.latency_runs).median_ms)
                thr[name].append(runner.throughput(x1, args.throughput_seconds))
        for name in runners:
            rows[name][f"{hint}_hint"] = {
                "latency_ms": {"median_ms": round(statistics.median(lat[name]), 4), "min_ms": min(lat[name]),
                               "rounds": lat[name], "threads": args.threads or None,
                               "runs_per_round": args.latency_runs, "batch": 1},
                "throughput_ips": round(statistics.median(thr[name]), 1),
                "throughput_rounds": [round(t, 1) for t in thr[name]],
            }

    fp32 = rows["fp32"]
    for name, row in rows.items():
        for hint in ("latency", "throughput"):
            h, f = row[f"{hint}_hint"], fp32[f"{hint}_hint"]
            h["latency_ratio_vs_fp32"] = round(h["latency_ms"]["median_ms"] / f["latency_ms"]["median_ms"], 3)
            h["throughput_ratio_vs_fp32"] = round(h["throughput_ips"] / f["throughput_ips"], 3)

    result = {
        "model": loaded.describe(), "recipe": recipe.name, "calibration": cal_src, "val": evals[1].source,
        "machine": {"cpu": _cpu_name(), "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg())},
        "tool_versions": target.tool_versions(), "variants": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


def table(rows: dict[str, dict[str, Any]]) -> str:
    header = ("variant", "top1 %", "d top1", "agree", "cosine", "agree sim", "lat ms L", "x fp32", "lat ms T",
              "x fp32", "img/s L", "img/s T", "x fp32", "MB")
    lines = []
    ref = None
    for name, r in rows.items():
        v = r["val"]["vs_float"]
        ref = v["reference_top1"] if ref is None else ref
        sim = r["val"].get("vs_pytorch_simulation")
        lat, thr = r["latency_hint"], r["throughput_hint"]
        lines.append((name, f"{100 * v['top1']:.2f}", f"{100 * (v['top1'] - v['reference_top1']):+.2f}",
                      f"{100 * v['top1_agreement']:.1f}%", f"{v['cosine']:.4f}",
                      "-" if not sim or r["precision"] != "int8" else f"{100 * sim['top1_agreement']:.1f}%",
                      f"{lat['latency_ms']['median_ms']:.2f}", f"{lat['latency_ratio_vs_fp32']:.2f}",
                      f"{thr['latency_ms']['median_ms']:.2f}", f"{thr['latency_ratio_vs_fp32']:.2f}",
                      f"{lat['throughput_ips']:.0f}", f"{thr['throughput_ips']:.0f}",
                      f"{thr['throughput_ratio_vs_fp32']:.2f}", f"{r['size_mb']:.2f}"))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    head = (f"float top-1 on val: {100 * ref:.2f}%. agree = top-1 agreement with float; agree sim = with the PT2E "
            f"simulation; L/T = LATENCY/THROUGHPUT hint; latency is batch 1; x fp32 = ratio to fp32")
    return "\n".join([head, fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def _cpu_name() -> str:
    try:
        import openvino as ov

        return f"{ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')} ({os.cpu_count()} cores)"
    except Exception:  # the name is decoration only
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
