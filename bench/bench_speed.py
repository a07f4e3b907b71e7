"""int8 vs float speed where users run: each model at its timm default (native) input size, batch 1.

For every model x runtime (onnxruntime CPU, LiteRT/XNNPACK, OpenVINO CPU) x thread count, the fp32 and int8
artifacts built by `mnv4-deploy convert` are loaded in their runtime and timed in alternating blocks (float,
int8, int8, float, ...) in one process, so machine noise hits both; the table quotes medians, p90 and the
int8/float ratio of medians. Beside each row: how many convolutions/matmuls the runtime executes in int8
(manifest `structure.int8_compute`, read from the runtime's own executed graph) and the conversion time.

Weights: the reference conv_small checkpoint where ../shared has it (trained at 64x64; run at 224 here, which
only matters for accuracy, not speed), random weights otherwise. Calibration: the scikit-image photos.

  .venv/bin/python bench/bench_speed.py                                   # conv_small, conv_medium, hybrid_medium
  .venv/bin/python bench/bench_speed.py --models mobilenetv4_conv_small --threads 2 --blocks 10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "models" / "mnv4_conv_small_tin202.pth"
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
    if model == "mobilenetv4_conv_small" and REFERENCE.is_file():
        return str(REFERENCE), 202
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


def _runner(result: Any, threads: int) -> tuple[Any, np.ndarray]:
    """The artifact loaded in its runtime with `threads` intra-op threads, and one input image."""
    from mnv4_deploy.config.recipes import load_recipe
    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.targets import ExportRequest, get_target, options_for

    m = result.manifest
    target = get_target(result.target)
    loaded = load_model(m["model"]["name"], "random", m["model"]["num_classes"],
                        {"input_size": m["input"]["shape"][2:] if m["input"]["layout"] == "NCHW"
                         else m["input"]["shape"][1:3], "crop_pct": 1.0})
    options = dataclasses.replace(options_for(load_recipe(None), result.target), threads=threads)
    runner = target.load(result.path, ExportRequest(loaded, result.precision, options))
    x = np.random.default_rng(0).standard_normal((1, 3, *loaded.preprocessing.input_size)).astype(np.float32)
    return runner, x


def interleaved(runners: dict[str, tuple[Any, np.ndarray]], blocks: int, per_block: int) -> dict[str, list[float]]:
    """Milliseconds per call, fp32 and int8 alternating in blocks (ABBA order) after a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn, x in runners.values():
        for _ in range(10):
            fn(x)
    for b in range(blocks):
        order = list(runners) if b % 2 == 0 else list(reversed(runners))
        for key in order:
            fn, x = runners[key]
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn(x)
                times[key].append((time.perf_counter() - t0) * 1000.0)
    return times


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 4), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 4),
            "runs": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenetv4_conv_small", "mobilenetv4_conv_medium",
                                                    "mobilenetv4_hybrid_medium"])
    ap.add_argument("--targets", nargs="+", default=["onnx", "tflite", "openvino"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--blocks", type=int, default=10, help="alternating blocks per precision")
    ap.add_argument("--per-block", type=int, default=20, help="timed calls per block")
    ap.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    args = ap.parse_args()

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
                    runners = {p: _runner(r, threads) for p, r in pair.items()}
                    times = interleaved(runners, args.blocks, args.per_block)
                    fp32, int8 = _stats(times["fp32"]), _stats(times["int8"])
                    m = pair["int8"].manifest
                    rows.append({
                        "model": model, "input": m["input"]["shape"], "weights": m["model"]["weights"],
                        "target": target, "threads": threads, "fp32": fp32, "int8": int8,
                        "ratio_int8_over_fp32": round(int8["median_ms"] / fp32["median_ms"], 3),
                        "int8_compute": m["structure"].get("int8_compute"),
                        "gate_passed": m["verification"]["gate"]["passed"],
                        "convert_seconds": {p: built[p]["seconds"] for p in built},
                    })
                    log(f"  {target} x{threads}: {fp32['median_ms']:.2f} -> {int8['median_ms']:.2f} ms")
    print(f"{'model':28} {'input':>9} {'runtime':9} {'thr':>3} {'fp32 ms':>8} {'int8 ms':>8} {'ratio':>6} "
          f"{'int8 compute':>13}")
    for r in rows:
        c = r["int8_compute"]
        compute = f"{c['int8']}/{c['total']}" if c else "-"
        size = "x".join(str(d) for d in (r["input"][2:] if r["input"][1] == 3 else r["input"][1:3]))
        print(f"{r['model']:28} {size:>9} {r['target']:9} {r['threads']:>3} {r['fp32']['median_ms']:8.2f} "
              f"{r['int8']['median_ms']:8.2f} {r['ratio_int8_over_fp32']:6.2f} {compute:>13}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"rows": rows, "blocks": args.blocks, "per_block": args.per_block}, indent=2))
    log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
