"""CoreML programs run by the reference ML Program executor (mnv4_deploy/targets/coreml/mlprogram), on Linux.

Two parts, one table each, and JSON in bench/results/coreml_executor.json:

1. programs: the fp32, fp16, W8 (weights-only) and W8A8 programs of conv_small (reference checkpoint, 64x64) and
   hybrid_medium (random weights and the 1-epoch checkpoint, 64x64 and 256x256), written by the coreml target's
   export and executed: logits vs PyTorch float (fp32 must stay within 1e-4 max abs), W8A8 vs the PyTorch int8
   simulation and tensor by tensor, executor seconds per image (one thread; not Core ML's latency).
2. agreement: the pipeline (`convert --to onnx,coreml --int8` through the Python API) on conv_small; the int8 ONNX
   artifact in onnxruntime and the W8A8 program in the executor, each against the PyTorch int8 simulation on the
   same val images.

  python bench/bench_coreml_executor.py [--shared ../shared] [--part programs|agreement|all] [--val-images N]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnv4_deploy.infra.fileio import write_json  # noqa: E402

logger = logging.getLogger("bench_coreml_executor")
KINDS = (("fp32", "fp32", False), ("fp16", "fp16", False), ("w8", "int8", True), ("w8a8", "int8", False))


def _images(folder: Path, n: int, pre: Any, seed: int) -> Any:
    from mnv4_deploy.load.images import load_images, scan_folder

    return load_images(scan_folder(folder).sample(n, seed=seed), pre)


def _program_rows(shared: Path, images: int, tmp: Path) -> list[dict[str, Any]]:
    import torch

    from mnv4_deploy import load_model, prepare
    from mnv4_deploy.config.recipes import load_recipe
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.targets import ExportRequest, get_target
    from mnv4_deploy.targets.coreml.target import CoremlOptions, ExecutedRunner
    from mnv4_deploy.verify import tensorwise
    from mnv4_deploy.verify.fidelity import compare

    data = shared / "data" / "tiny-imagenet-202"
    configs = [("mobilenetv4_conv_small", shared / "models" / "mnv4_conv_small_tin202.pth", 64),
               ("mobilenetv4_hybrid_medium", "random", 64), ("mobilenetv4_hybrid_medium", "random", 256),
               ("mobilenetv4_hybrid_medium", shared / "models" / "mnv4_hybrid_medium_tin202_e1.pth", 64),
               ("mobilenetv4_hybrid_medium", shared / "models" / "mnv4_hybrid_medium_tin202_e1.pth", 256)]
    target = get_target("coreml")
    rows = []
    for model, weights, size in configs:
        label = "random" if weights == "random" else Path(weights).stem
        loaded = load_model(model, str(weights), 202, {"input_size": [size], "crop_pct": 1.0})
        prepare(loaded.model)
        cal = _images(data / "train", 32, loaded.preprocessing, seed=0)
        val = _images(data / "val", images, loaded.preprocessing, seed=1)
        started = time.perf_counter()
        quantized = quantize(loaded.model, cal, load_recipe(None), "tin202 train (32)")
        quantize_s = time.perf_counter() - started
        with torch.no_grad():
            ref = loaded.model(torch.from_numpy(val.x)).numpy()
        sim = quantized.simulate(val.x)
        for kind, precision, weights_only in KINDS:
            request = ExportRequest(loaded, precision, CoremlOptions(weights_only=weights_only),
                                    quantized if precision == "int8" else None, cal)
            path = tmp / f"{model}-{label}-{size}-{kind}" / "model.mlpackage"
            started = time.perf_counter()
            target.export(request, path)
            export_s = time.perf_counter() - started
            runner = ExecutedRunner(path, request)
            runner(val.x[:1])  # warm-up
            started = time.perf_counter()
            logits = runner(val.x)
            per_image = (time.perf_counter() - started) / len(val.x)
            row: dict[str, Any] = {
                "model": model, "weights": label, "size": size, "program": kind, "images": len(val.x),
                "ops": sum(1 for _ in runner.executor.program.ops), "op_types": runner.executor.op_types,
                "executes": bool(np.isfinite(logits).all()),
                "max_abs_vs_float": float(np.abs(logits - ref).max()), "max_abs_float_logit": float(np.abs(ref).max()),
                "top1_vs_float": compare(logits, ref).to_dict()["top1_agreement"],
                "executor_s_per_image": round(per_image, 4), "export_s": round(export_s, 1)}
            if kind == "w8a8":
                row["quantize_s"] = round(quantize_s, 1)
                row["top1_vs_simulation"] = compare(logits, sim).to_dict()["top1_agreement"]
                row["max_abs_vs_simulation"] = float(np.abs(logits - sim).max())
                s = tensorwise.check(target, path, request, val.x[:tensorwise.IMAGES])["summary"]
                row["tensorwise"] = {k: s.get(k) for k in ("matched", "pytorch_quantizers", "flagged",
                                                           "max_local_lsb", "max_accumulated_lsb")}
                row["tensorwise"]["unmatched_pytorch"] = len(s.get("unmatched_pytorch") or [])
            logger.info(f"{model} {label} {size} {kind}: {row}")
            rows.append(row)
    return rows


def _agreement(shared: Path, images: int, tmp: Path) -> dict[str, Any]:
    """Both int8 artifacts of one pipeline run against the same simulation on the same val images."""
    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.pipeline import ConvertSettings, deploy, start_run
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.targets import ExportRequest, get_target
    from mnv4_deploy.verify.fidelity import compare

    data = shared / "data" / "tiny-imagenet-202"
    settings = ConvertSettings(model="mobilenetv4_conv_small", weights=str(shared / "models" / "mnv4_conv_small_tin202.pth"),
                               num_classes=202, targets="onnx,coreml", precision="int8",
                               preprocessing={"input_size": [64], "crop_pct": 1.0}, calib=data / "train",
                               out=tmp / "pipeline", latency_runs=5, progress=False)
    run = start_run(settings)
    shared_q: dict[str, Any] = {}

    def quantized_for(target: Any) -> Any:  # as pipeline.convert: one PTQ shared by both targets
        if "q" not in shared_q:
            shared_q["q"] = quantize(run.loaded.model, run.calibration, run.recipe, run.calibration_source)
        return shared_q["q"]

    results = {r.target: r for r in deploy(run, quantized_for)}
    q = shared_q["q"]
    val = load_images(scan_folder(data / "val").sample(images, seed=0), run.loaded.preprocessing)
    sim = q.simulate(val.x)
    out: dict[str, Any] = {"images": len(val.x), "source": f"tiny-imagenet-202/val (random {len(val.x)}, seed 0)"}
    for name, r in results.items():
        target = get_target(name)
        deployed = q.for_target(target.int16_activations)
        request = ExportRequest(run.loaded, "int8", _options(run, target), deployed, run.calibration)
        runner = target.load(r.path, request)
        started = time.perf_counter()
        logits = np.concatenate([runner(val.x[i:i + 64]) for i in range(0, len(val.x), 64)])
        seconds = time.perf_counter() - started
        fid = compare(logits, sim, val.labels).to_dict()
        v = r.manifest["verification"]
        out[name] = {"numbers": v["numbers"], "top1_vs_simulation": fid["top1_agreement"], "cosine_vs_simulation":
                     fid.get("cosine"), "top1_accuracy": fid.get("top1"),
                     "manifest_held_back_vs_simulation": v["held_back"].get("vs_pytorch_simulation"),
                     "manifest_tensorwise": {k: v["tensorwise"].get(k) for k in ("status", "matched", "flagged")},
                     "manifest_latency": v["latency"].get("median_ms", None), "run_s": round(seconds, 1)}
    out["difference_points"] = round(100 * (out["coreml"]["top1_vs_simulation"] - out["onnx"]["top1_vs_simulation"]), 2)
    return out


def _options(run: Any, target: Any) -> Any:
    from mnv4_deploy.pipeline import apply_overrides
    from mnv4_deploy.targets import options_for

    return apply_overrides(options_for(run.recipe, target.name), run.settings.target_options)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--part", choices=("programs", "agreement", "all"), default="all")
    ap.add_argument("--images", type=int, default=16, help="val images per program (part 1)")
    ap.add_argument("--val-images", type=int, default=1200, help="val images for the agreement (part 2; 5050 = all)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "coreml_executor.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mnv4_deploy.targets.coreml.mlprogram import covered

    result: dict[str, Any] = {"executor_ops": covered()}
    if args.out.is_file():  # keep the other part's numbers when only one part runs
        import json

        result = {**json.loads(args.out.read_text()), **result}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("programs", "all"):
            result["programs"] = _program_rows(args.shared, args.images, Path(tmp))
        if args.part in ("agreement", "all"):
            result["agreement"] = _agreement(args.shared, args.val_images, Path(tmp))
    write_json(args.out, result)
    print(f"executor ops ({len(result['executor_ops'])}): {', '.join(result['executor_ops'])}")
    if "programs" in result:
        print(f"{'model':<26}{'weights':<28}{'size':>5} {'program':<7}{'ops':>5}{'max|d| float':>14}"
              f"{'top1 float':>11}{'top1 sim':>9}{'flagged':>8}{'s/img':>8}")
        for r in result["programs"]:
            tw = r.get("tensorwise") or {}
            print(f"{r['model']:<26}{r['weights']:<28}{r['size']:>5} {r['program']:<7}{r['ops']:>5}"
                  f"{r['max_abs_vs_float']:>14.3g}{r['top1_vs_float']:>11.3f}"
                  f"{r.get('top1_vs_simulation', float('nan')):>9.3f}{str(tw.get('flagged', '')):>8}"
                  f"{r['executor_s_per_image']:>8.3f}")
    if "agreement" in result:
        a = result["agreement"]
        print(f"\nint8 vs the PyTorch int8 simulation on {a['images']} val images (conv_small reference):")
        for name in ("onnx", "coreml"):
            print(f"  {name:<7} ({a[name]['numbers']}): top-1 agreement {a[name]['top1_vs_simulation']:.4f}")
        print(f"  difference (coreml - onnx): {a['difference_points']:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
