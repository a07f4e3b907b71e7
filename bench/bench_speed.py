"""int8 vs float speed where users run: each model at its timm default (native) input size, batch 1.

For every model x runtime (onnxruntime CPU, LiteRT/XNNPACK, OpenVINO CPU) x thread count, the fp32 and int8
artifacts built by `mnv4-deploy convert` are loaded in their runtime and timed in alternating blocks in one
process (mnv4_deploy/verify/speed.py, the same code as the report's speed table), so machine noise hits all
alike. int8 is quoted against two floats:

  strict    int8 / fp32 with the float layers in f32 (how verification runs them)
  default   int8 as shipped (its manifest's runtime settings) / the float the runtime runs when the user sets
            nothing (OpenVINO: bf16 on CPUs with bf16 support, read from the plugin)
  rt-def    int8 under the runtime's default settings / that float (OpenVINO: the int8 IR's float layers in
            bf16), where those differ from the shipped settings

Beside ours, the runtimes' own tools time the same artifacts (`--tools`): OpenVINO's `benchmark_app` (default
precision and `-infer_precision f32`) and LiteRT's `litert-benchmark` (its CompiledModel API). Those runs are
sequential, not interleaved: a cross-check of ours, not the ratio of record (this VM's speed drifts by up to
2x between runs a minute apart).
Also: how many convolutions/matmuls the runtime executes in int8 (from its executed graph) and conversion time.

Weights: the reference conv_small and hybrid_medium checkpoints where ../shared has them (trained at 64x64; run
at 224/256 here, which only matters for accuracy, not speed), random weights otherwise. Calibration: the scikit-image photos.

  .venv/bin/python bench/bench_speed.py                                   # conv_small, conv_medium, hybrid_medium
  .venv/bin/python bench/bench_speed.py --models mobilenetv4_hybrid_medium --threads 2 --tools
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Reference checkpoints (trained at 64x64, 202 classes): real activation ranges, so the int8 graph (and which of
# its layers the runtime can run in int8) is the one a trained model gets. Random weights give the hybrid's
# attention degenerate ranges.
REFERENCE = {"mobilenetv4_conv_small": REPO.parent / "shared" / "models" / "mnv4_conv_small_tin202.pth",
             "mobilenetv4_hybrid_medium": REPO.parent / "shared" / "models" / "mnv4_hybrid_medium_tin202_e1.pth"}
RECIPE = """\
name: bench-speed
quantization:
  calibration: {images: 64, batch_size: 16}
verification: {images: 16, batch_size: 8}
"""


def log(msg: str) -> None:
    """Progress on stderr; the table and JSON go to stdout."""
    print(msg, file=sys.stderr, flush=True)


def _weights(model: str) -> tuple[str, int | None]:
    if model in REFERENCE and REFERENCE[model].is_file():
        return str(REFERENCE[model]), 202
    return "random", None


def build(model: str, targets: list[str], out: Path, recipe: Path) -> dict[str, Any]:
    """fp32 and int8 artifacts of `model` at its native size; conversion seconds per precision."""
    from mnv4_deploy.pipeline import ConvertSettings, convert

    weights, classes = _weights(model)
    built: dict[str, Any] = {}
    for precision in ("fp32", "int8"):
        start = time.perf_counter()
        results = convert(ConvertSettings(
            model=model, weights=weights, num_classes=classes, out=out / precision, targets=",".join(targets),
            precision=precision, recipe=str(recipe), latency_runs=1, progress=False, verify_gate=False))
        built[precision] = {"seconds": round(time.perf_counter() - start, 1), "results": {r.target: r for r in results}}
    return built


def _request(result: Any, threads: int) -> tuple[Path, Any]:
    """(artifact path, ExportRequest) that loads the artifact in its runtime with `threads` intra-op threads."""
    from mnv4_deploy.config.recipes import load_recipe
    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.targets import ExportRequest, options_for

    loaded = load_model(result.manifest["model"]["name"], "random", result.manifest["model"]["num_classes"],
                        {"input_size": _size(result.manifest), "crop_pct": 1.0})
    options = dataclasses.replace(options_for(load_recipe(None), result.target), threads=threads)
    return result.path, ExportRequest(loaded, result.precision, options)


def _size(manifest: dict[str, Any]) -> list[int]:
    shape = manifest["input"]["shape"]
    return shape[2:] if manifest["input"]["layout"] == "NCHW" else shape[1:3]


def _median(text: str, pattern: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def tool_timings(target: str, pair: dict[str, Any], threads: int, size: list[int], seconds: int = 10) -> dict[str, Any]:
    """The runtime's own benchmark tool on the same fp32 and int8 artifacts (median ms), one after the other."""
    venv_bin = Path(sys.executable).parent
    out: dict[str, Any] = {}
    for precision, result in pair.items():
        if target == "openvino":
            base = [str(venv_bin / "benchmark_app"), "-m", str(Path(result.path) / "model.xml"), "-d", "CPU",
                    "-hint", "none", "-nstreams", "1", "-nireq", "1", "-nthreads", str(threads), "-t", str(seconds),
                    "-data_shape", f"[1,3,{size[0]},{size[1]}]"]
            for label, extra in (("default precision", []), ("f32", ["-infer_precision", "f32"])):
                run = subprocess.run(base + extra, capture_output=True, text=True)
                out[f"benchmark_app {precision} ({label})"] = _median(run.stdout + run.stderr, r"Median:\s+([\d.]+) ms")
        elif target == "tflite":
            run = subprocess.run([str(venv_bin / "litert-benchmark"), "--model", str(result.path), "--num_threads",
                                  str(threads), "--num_runs", "200", "--warmup_runs", "20"], capture_output=True, text=True)
            text = run.stdout + run.stderr
            out[f"litert-benchmark {precision}"] = (_median(text, r"[Mm]edian[^\d\n]*([\d.]+)")
                                                    or _median(text, r"[Aa]verage[^\d\n]*([\d.]+)"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenetv4_conv_small", "mobilenetv4_conv_medium",
                                                    "mobilenetv4_hybrid_medium"])
    ap.add_argument("--targets", nargs="+", default=["onnx", "tflite", "openvino"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--runs", type=int, default=200, help="timed calls per variant (interleaved in blocks)")
    ap.add_argument("--tools", action="store_true", help="also time with benchmark_app / litert-benchmark")
    ap.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    args = ap.parse_args()

    from mnv4_deploy.targets import get_target
    from mnv4_deploy.verify.speed import compare_int8_speed

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(RECIPE)
        for model in args.models:
            log(f"{model}: converting fp32 and int8 for {', '.join(args.targets)}")
            built = build(model, args.targets, Path(tmp) / model, recipe)
            for target in args.targets:
                pair = {p: built[p]["results"].get(target) for p in ("fp32", "int8")}
                if None in pair.values():
                    log(f"  {target}: not built")
                    continue
                for threads in args.threads:
                    timed = compare_int8_speed(get_target(target), _request(pair["fp32"], threads),
                                               _request(pair["int8"], threads), runs=args.runs)
                    m = pair["int8"].manifest
                    row = {"model": model, "input": _size(m), "weights": m["model"]["weights"], "target": target,
                           "threads": threads, **{k: v for k, v in timed.items() if k not in ("target", "batch")},
                           "int8_compute": m["structure"].get("int8_compute"),
                           "gate_passed": m["verification"]["gate"]["passed"],
                           "convert_seconds": {p: built[p]["seconds"] for p in built}}
                    if args.tools and target in ("openvino", "tflite"):
                        log(f"  {target} x{threads}: the runtime's own benchmark tool")
                        row["runtime_tool"] = tool_timings(target, pair, threads, _size(m))
                    rows.append(row)
                    s, d = row["strict_f32"], row["runtime_default"]
                    log(f"  {target} x{threads}: int8/fp32 {s['int8_over_float']:.2f}, "
                        f"int8/default float ({d['float_is'].split()[0]}) {d['int8_over_float']:.2f}")
    print_table(rows)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"rows": rows, "runs": args.runs}, indent=2))
    log(f"wrote {args.json_out}")
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':28} {'input':>9} {'runtime':9} {'thr':>3} {'fp32 ms':>8} {'int8 ms':>8} {'int8/fp32':>9} "
          f"{'default':>7} {'float ms':>8} {'int8 ms':>8} {'int8/def':>8} {'rt-def':>6} {'int8 compute':>13}")
    for r in rows:
        c, s, d = r["int8_compute"], r["strict_f32"], r["runtime_default"]
        compute = f"{c['int8']}/{c['total']}" if c else "-"
        rt = f"{r['int8_runtime_defaults']['int8_over_float']:.2f}" if r.get("int8_runtime_defaults") else "same"
        print(f"{r['model']:28} {'x'.join(map(str, r['input'])):>9} {r['target']:9} {r['threads']:>3} "
              f"{s['fp32']['median_ms']:8.2f} {s['int8']['median_ms']:8.2f} {s['int8_over_float']:9.2f} "
              f"{d['float_is'].split()[0]:>7} {d['float']['median_ms']:8.2f} {d['int8']['median_ms']:8.2f} "
              f"{d['int8_over_float']:8.2f} {rt:>6} {compute:>13}")
    tools = [r for r in rows if r.get("runtime_tool")]
    if tools:
        print("\nthe runtimes' own tools (median ms, sequential runs):")
        for r in tools:
            print(f"  {r['model']} {r['target']} x{r['threads']}: " +
                  ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in r["runtime_tool"].items()))


if __name__ == "__main__":
    sys.exit(main())
